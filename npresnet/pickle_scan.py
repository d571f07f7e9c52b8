"""A pass over a pickle's opcodes that refuses a hostile or malformed checkpoint before anything is built.

``RestrictedUnpickler`` (``checkpoint.py``) already refuses every global outside its allowlist, so
no pickled code runs. What it cannot stop is the C unpickler's own work on a hostile stream: a
memo index of billions (LONG_BINPUT) sizes the memo array to it, BINBYTES8 claiming gigabytes
allocates them, a tuple nested a million deep crashes the interpreter when it is hashed or freed,
a BUILD on the checkpoint's OrderedDict can shadow its ``items``. ``check_pickle`` walks the
stream first, with bounds of its own, and simulates the stack with small descriptions of what
each opcode would build (kind, nesting depth, tree size), so that it refuses:

* any opcode a checkpoint does not need (the text-protocol forms, INST/OBJ/NEWOBJ, EXT*,
  out-of-band buffers) and any global outside the allowlist;
* arguments longer than the bytes present; integers longer than 32 bytes;
* a memo index beyond the number of opcodes read so far, or a GET of an index never PUT;
* nesting deeper than MAX_DEPTH, containers of more than MAX_ITEMS entries, objects whose tree
  (shared parts counted at each use) exceeds MAX_TREE nodes;
* dict keys and set items that are not str or int (within +-2**24, so that no crafted keys can
  collide in hash), so hashing never walks a container;
* a container changed after it was placed in another one (which is also how cycles are made);
* REDUCE other than an allowed rebuild function or ``OrderedDict()``, and BUILD other than
  torch's ``_metadata`` attribute on an OrderedDict;
* more memory for the objects it describes than the file's budget allows (``archive.LoadBudget``).

Messages describe what was found by kind and size, never by repr of the untrusted object.

References: ``pickletools`` (the opcode table and argument formats; ``genops`` is the model for
this walk, but it trusts lengths), PEP 3154 (protocol 4: FRAME, MEMOIZE, STACK_GLOBAL),
PEP 574 (protocol 5 buffers), torch ``_weights_only_unpickler.py`` (the same check inside torch).
"""
from __future__ import annotations

from typing import Any, Callable

from .archive import LoadBudget
from .errors import WeightsError

MAX_DEPTH = 32  # a state dict in a training checkpoint nests about 8 deep
MAX_ITEMS = 1_000_000
MAX_TREE = 10_000_000
MAX_INT_BYTES = 32
MAX_KEY_INT = 1 << 24
MAX_GLOBAL_NAME = 256
OBJECT_BYTES = 64  # what a new Python object costs, roughly; each container slot costs SLOT_BYTES more
SLOT_BYTES = 16


class Node:
    """What an opcode pushes: its kind, nesting depth, tree size, and for short strings and ints the value."""

    __slots__ = ("kind", "depth", "size", "value", "frozen", "count", "keys")

    def __init__(self, kind: str, value=None):
        self.kind = kind
        self.depth = 1
        self.size = 1
        self.value = value
        self.frozen = False  # placed inside another container: no longer to be changed
        self.count = 0  # entries, for containers
        self.keys = set() if kind == "dict" else None  # a small dict's str keys, for BUILD


CONTAINERS = {"tuple", "list", "dict", "odict", "set", "frozenset"}


def describe(node: Node) -> str:
    if node.kind in CONTAINERS:
        return f"a {node.kind} of {node.count} entries"
    return f"a {node.kind}"


class Scanner:
    """One walk over one pickle: the position, the simulated stack and memo, and the bytes described so far."""

    def __init__(self, data, pos: int, source: str, budget: LoadBudget, classify_global: Callable[[str, str], str]):
        self.data = data
        self.pos = pos
        self.source = source
        self.budget = budget
        self.classify_global = classify_global
        self.stack: list[Node] = []
        self.marks: list[int] = []
        self.memo: dict[int, Node] = {}
        self.ops = 0
        self.used = 0  # bytes of the objects described so far
        self.allowed = budget.limit - budget.used

    def fail(self, problem: str, at: int | None = None) -> WeightsError:
        where = self.pos if at is None else at
        return WeightsError(f"{self.source}: corrupt checkpoint pickle: {problem} (opcode at byte {where})")

    # --- reading arguments, every length checked against the bytes present ---

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or n > len(self.data) - start:
            raise self.fail(f"a {what} of {n} bytes, but only {len(self.data) - start} remain")
        self.pos = start + n
        return start

    def unsigned(self, n: int) -> int:
        start = self.take(n, "argument")
        return int.from_bytes(self.data[start : start + n], "little")

    def line(self) -> str:
        end = self.data.find(b"\n", self.pos, self.pos + MAX_GLOBAL_NAME + 1)
        if end < 0:
            raise self.fail(f"a global name longer than {MAX_GLOBAL_NAME} bytes or unterminated")
        try:
            text = bytes(self.data[self.pos : end]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a global name that is not UTF-8") from None
        self.pos = end + 1
        return text

    # --- the stack ---

    def push(self, node: Node, nbytes: int = OBJECT_BYTES) -> None:
        # Counted here and charged to the budget once at STOP: a call per opcode would double the walk's cost.
        self.used += nbytes
        if self.used > self.allowed:
            self.budget.charge(self.used, "the objects of the checkpoint pickle")
        self.stack.append(node)

    def pop(self) -> Node:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise self.fail("stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list[Node]:
        if not self.marks:
            raise self.fail("no MARK to pop to")
        at = self.marks.pop()
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def top(self) -> Node:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise self.fail("stack underflow")
        return self.stack[-1]

    def adopt(self, parent: Node, children: list[Node]) -> None:
        """Make `children` entries of `parent`: depth, tree size and entry count grow, each bounded."""
        depth, size = parent.depth, parent.size
        for child in children:
            child.frozen = True
            depth = max(depth, child.depth + 1)
            size += child.size
        if parent.frozen:  # checked after the children are marked, so that a container cannot hold itself
            raise self.fail(f"{describe(parent)} changed after it was placed in another container (or a cycle)")
        parent.depth, parent.size = depth, min(size, MAX_TREE + 1)
        parent.count += len(children)
        if depth > MAX_DEPTH:
            raise self.fail(f"nesting deeper than {MAX_DEPTH}")
        if parent.size > MAX_TREE:
            raise self.fail(f"an object of more than {MAX_TREE} parts (shared parts counted at each use)")
        if parent.count > MAX_ITEMS:
            raise self.fail(f"a {parent.kind} of more than {MAX_ITEMS} entries")
        self.used += SLOT_BYTES * len(children)

    def check_key(self, key: Node) -> None:
        if key.kind == "str" or (key.kind in ("int", "bool") and key.value is not None and -MAX_KEY_INT <= key.value < MAX_KEY_INT):
            return
        raise self.fail(f"a dict key or set item that is {describe(key)}; only str and small int keys are read")

    def set_items(self, target: Node, pairs: list[Node]) -> None:
        if target.kind not in ("dict", "odict"):
            raise self.fail(f"SETITEM(S) on {describe(target)}")
        if len(pairs) % 2:
            raise self.fail("SETITEMS with an odd number of items")
        for key in pairs[0::2]:
            self.check_key(key)
            if target.keys is not None:
                target.keys.add(key.value if key.kind == "str" else None)
                if len(target.keys) > 8:
                    target.keys = None  # only small dicts can be a BUILD state
        self.adopt(target, pairs)
        target.count -= len(pairs) // 2

    def new_container(self, kind: str, items: list[Node]) -> Node:
        node = Node(kind)
        if items:
            self.adopt(node, items)
        self.push(node)
        return node

    def string(self, n: int, kind: str, decode: bool) -> None:
        start = self.take(n, kind)
        value = None
        if decode and n <= MAX_GLOBAL_NAME:
            try:
                value = bytes(self.data[start : start + n]).decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                raise self.fail("a string that is not UTF-8") from None
        self.push(Node(kind, value), OBJECT_BYTES + n)

    def integer(self, n: int, signed: bool = True) -> None:
        if n > MAX_INT_BYTES:
            raise self.fail(f"an integer of {n} bytes")
        start = self.take(n, "integer")
        self.push(Node("int", int.from_bytes(self.data[start : start + n], "little", signed=signed)))

    def global_(self, module: str, name: str) -> None:
        self.push(Node("global", self.classify_global(module, name)))

    # --- the walk: one method per opcode, found by OPCODES ---

    def run(self) -> int:
        data, handlers = self.data, OPCODES
        end = len(data)
        while True:
            at = self.pos
            if at >= end:
                raise self.fail("the pickle ends without STOP")
            op = data[at]
            self.pos = at + 1
            self.ops += 1
            handler = handlers.get(op)
            if handler is None:
                raise self.fail(f"opcode {bytes([op])!r} is not used by checkpoints and is refused", at)
            if handler(self, at):
                self.budget.charge(self.used, "the objects of the checkpoint pickle")
                return self.pos

    def byte(self) -> int:
        at = self.pos
        if at >= len(self.data):
            raise self.fail("an argument past the end of the pickle")
        self.pos = at + 1
        return self.data[at]

    def op_binput(self, at):
        self.put(self.byte(), at)

    def op_binget(self, at):
        self.get(self.byte(), at)

    def op_long_binput(self, at):
        self.put(self.unsigned(4), at)

    def op_long_binget(self, at):
        self.get(self.unsigned(4), at)

    def op_memoize(self, at):
        self.put(len(self.memo), at)

    def op_short_binunicode(self, at):
        self.string(self.byte(), "str", True)

    def op_binunicode(self, at):
        self.string(self.unsigned(4), "str", True)

    def op_binunicode8(self, at):
        self.string(self.unsigned(8), "str", True)

    def op_binstring(self, at):  # Python 2 str, decoded as ASCII by pickle
        self.string(self.unsigned(4), "str", True)

    def op_short_binstring(self, at):
        self.string(self.byte(), "str", True)

    def op_binbytes(self, at):
        self.string(self.unsigned(4), "bytes", False)

    def op_short_binbytes(self, at):
        self.string(self.byte(), "bytes", False)

    def op_binbytes8(self, at):  # also BYTEARRAY8
        self.string(self.unsigned(8), "bytes", False)

    def op_binint1(self, at):
        self.push(Node("int", self.byte()), 0)  # small ints are cached by Python: no new object

    def op_binint2(self, at):
        self.integer(2, signed=False)

    def op_binint(self, at):
        self.integer(4)

    def op_long1(self, at):
        self.integer(self.byte())

    def op_long4(self, at):
        self.integer(self.unsigned(4))

    def op_binfloat(self, at):
        self.take(8, "float")
        self.push(FLOAT)

    def op_newtrue(self, at):
        self.push(TRUE, 0)

    def op_newfalse(self, at):
        self.push(FALSE, 0)

    def op_none(self, at):
        self.push(NONE, 0)

    def op_mark(self, at):
        self.marks.append(len(self.stack))

    def op_empty_tuple(self, at):
        self.new_container("tuple", [])

    def op_tuple1(self, at):
        self.new_container("tuple", [self.pop()])

    def op_tuple2(self, at):
        second = self.pop()
        self.new_container("tuple", [self.pop(), second])

    def op_tuple3(self, at):
        third, second = self.pop(), self.pop()
        self.new_container("tuple", [self.pop(), second, third])

    def op_tuple(self, at):
        self.new_container("tuple", self.pop_mark())

    def op_empty_list(self, at):
        self.new_container("list", [])

    def op_list(self, at):
        self.new_container("list", self.pop_mark())

    def op_empty_dict(self, at):
        self.new_container("dict", [])

    def op_dict(self, at):
        items = self.pop_mark()
        node = Node("dict")
        self.set_items(node, items)
        self.push(node)

    def op_empty_set(self, at):
        self.new_container("set", [])

    def op_frozenset(self, at):
        items = self.pop_mark()
        for item in items:
            self.check_key(item)
        self.new_container("frozenset", items)

    def op_additems(self, at):
        items = self.pop_mark()
        target = self.top()
        if target.kind != "set":
            raise self.fail(f"ADDITEMS on {describe(target)}", at)
        for item in items:
            self.check_key(item)
        self.adopt(target, items)

    def op_append(self, at):
        value = self.pop()
        target = self.top()
        if target.kind != "list":
            raise self.fail(f"APPEND on {describe(target)}", at)
        self.adopt(target, [value])

    def op_appends(self, at):
        items = self.pop_mark()
        target = self.top()
        if target.kind != "list":
            raise self.fail(f"APPENDS on {describe(target)}", at)
        self.adopt(target, items)

    def op_setitem(self, at):
        value, key = self.pop(), self.pop()
        self.set_items(self.top(), [key, value])

    def op_setitems(self, at):
        items = self.pop_mark()
        self.set_items(self.top(), items)

    def op_global(self, at):
        module = self.line()
        self.global_(module, self.line())

    def op_stack_global(self, at):
        name, module = self.pop(), self.pop()
        if module.kind != "str" or name.kind != "str" or module.value is None or name.value is None:
            raise self.fail("STACK_GLOBAL of something other than two short strings", at)
        self.global_(module.value, name.value)

    def op_binpersid(self, at):
        pid = self.pop()
        if pid.kind != "tuple":
            raise self.fail(f"a persistent id that is {describe(pid)}", at)
        pid.frozen = True
        self.push(Node("storage"))

    def op_pop(self, at):
        self.pop()

    def op_pop_mark(self, at):
        self.pop_mark()

    def op_dup(self, at):
        self.push(self.top(), 8)

    def op_proto(self, at):
        if self.byte() > 5:
            raise self.fail("an unknown pickle protocol", at)

    def op_frame(self, at):
        size = self.unsigned(8)
        if size > len(self.data) - self.pos:
            raise self.fail(f"a frame of {size} bytes, but only {len(self.data) - self.pos} remain", at)

    def op_stop(self, at):
        if len(self.stack) != 1 or self.marks:
            raise self.fail(f"STOP with {len(self.stack)} objects on the stack", at)
        return True

    def put(self, index: int, at: int) -> None:
        if index > self.ops:
            raise self.fail(f"memo index {index} beyond the {self.ops} opcodes read", at)
        self.memo[index] = self.top()
        self.used += SLOT_BYTES

    def get(self, index: int, at: int) -> None:
        node = self.memo.get(index)
        if node is None:
            raise self.fail(f"memo index {index} was never stored", at)
        self.push(node, SLOT_BYTES)

    def op_reduce(self, at: int) -> None:
        args, func = self.pop(), self.pop()
        if func.kind != "global" or args.kind != "tuple":
            raise self.fail(f"REDUCE of {describe(func)} with {describe(args)}", at)
        if func.value == "OrderedDict":
            if args.count:
                raise self.fail("OrderedDict called with arguments", at)
            self.push(Node("odict"))
        elif func.value == "rebuild":
            node = Node("tensor")
            self.adopt(node, [args])
            self.push(node)
        else:
            raise self.fail(f"REDUCE of a {func.value} global", at)

    def op_build(self, at: int) -> None:
        state = self.pop()
        target = self.top()
        # torch pickles a state dict's _metadata (versions per module) as the OrderedDict's attribute.
        if target.kind != "odict" or state.kind != "dict" or target.frozen or not state.keys or state.keys != {"_metadata"}:
            raise self.fail(f"BUILD on {describe(target)} with {describe(state)}; only an OrderedDict's _metadata is read", at)
        self.adopt(target, [state])
        target.count -= 1


FLOAT, TRUE, FALSE, NONE = Node("float"), Node("bool", 1), Node("bool", 0), Node("none")

# Protocol 2 (what torch.save writes) and the protocol 3-5 forms a checkpoint may use. Everything
# else (the text forms of protocols 0-1, INST, OBJ, NEWOBJ, EXT*, out-of-band buffers) is refused.
OPCODES: dict[int, Callable[[Scanner, int], Any]] = {
    ord(code): getattr(Scanner, f"op_{name}")
    for code, name in [
        ("q", "binput"), ("h", "binget"), ("r", "long_binput"), ("j", "long_binget"), ("\x94", "memoize"),
        ("\x8c", "short_binunicode"), ("X", "binunicode"), ("\x8d", "binunicode8"), ("T", "binstring"),
        ("U", "short_binstring"), ("B", "binbytes"), ("C", "short_binbytes"), ("\x8e", "binbytes8"),
        ("\x96", "binbytes8"), ("K", "binint1"), ("M", "binint2"), ("J", "binint"), ("\x8a", "long1"),
        ("\x8b", "long4"), ("G", "binfloat"), ("\x88", "newtrue"), ("\x89", "newfalse"), ("N", "none"),
        ("(", "mark"), (")", "empty_tuple"), ("\x85", "tuple1"), ("\x86", "tuple2"), ("\x87", "tuple3"),
        ("t", "tuple"), ("]", "empty_list"), ("l", "list"), ("}", "empty_dict"), ("d", "dict"),
        ("\x8f", "empty_set"), ("\x91", "frozenset"), ("\x90", "additems"), ("a", "append"),
        ("e", "appends"), ("s", "setitem"), ("u", "setitems"), ("c", "global"), ("\x93", "stack_global"),
        ("R", "reduce"), ("b", "build"), ("Q", "binpersid"), ("0", "pop"), ("1", "pop_mark"), ("2", "dup"),
        ("\x80", "proto"), ("\x95", "frame"), (".", "stop"),
    ]
}


def check_pickle(data, start: int, source: str, budget: LoadBudget, classify_global: Callable[[str, str], str]) -> int:
    """Validate the pickle that starts at `data[start]`; return where it ends (just after STOP).

    classify_global(module, name) returns "OrderedDict", "rebuild" or "storage" for an allowed
    global and raises WeightsError for any other. Raises WeightsError naming `source` for the rest.
    """
    return Scanner(data, start, source, budget, classify_global).run()
