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

import struct
from typing import Callable

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


SCALARS = {"none", "bool", "int", "float", "str", "bytes"}
CONTAINERS = {"tuple", "list", "dict", "odict", "set", "frozenset"}


def describe(node: Node) -> str:
    if node.kind in CONTAINERS:
        return f"a {node.kind} of {node.count} entries"
    return f"a {node.kind}"


class Scanner:
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

    def fail(self, problem: str, at: int | None = None) -> WeightsError:
        where = self.pos if at is None else at
        return WeightsError(f"{self.source}: corrupt checkpoint pickle: {problem} (opcode at byte {where})")

    # --- reading arguments, every length checked against the bytes present ---

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or n > len(self.data) - start:
            raise self.fail(f"{what} of {n} bytes, but only {len(self.data) - start} remain")
        self.pos = start + n
        return start

    def unsigned(self, n: int) -> int:
        start = self.take(n, "an argument")
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
        self.budget.charge(nbytes, "the objects of the checkpoint pickle")
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
        if parent.frozen:
            raise self.fail(f"{describe(parent)} changed after it was placed in another container (or a cycle)")
        depth, size = parent.depth, parent.size
        for child in children:
            child.frozen = True
            depth = max(depth, child.depth + 1)
            size += child.size
        parent.depth, parent.size = depth, min(size, MAX_TREE + 1)
        parent.count += len(children)
        if depth > MAX_DEPTH:
            raise self.fail(f"nesting deeper than {MAX_DEPTH}")
        if parent.size > MAX_TREE:
            raise self.fail(f"an object of more than {MAX_TREE} parts (shared parts counted at each use)")
        if parent.count > MAX_ITEMS:
            raise self.fail(f"a {parent.kind} of more than {MAX_ITEMS} entries")
        self.budget.charge(SLOT_BYTES * len(children), "the objects of the checkpoint pickle")

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
        self.adopt(node, items)
        self.push(node)
        return node

    def string(self, n: int, kind: str, decode: bool) -> None:
        start = self.take(n, f"a {kind}")
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
        start = self.take(n, "an integer")
        self.push(Node("int", int.from_bytes(self.data[start : start + n], "little", signed=signed)))

    def global_(self, module: str, name: str) -> None:
        self.push(Node("global", self.classify_global(module, name)))

    # --- the walk ---

    def run(self) -> int:
        data = self.data
        while True:
            if self.pos >= len(data):
                raise self.fail("the pickle ends without STOP")
            at = self.pos
            op = data[at]
            self.pos = at + 1
            self.ops += 1
            if op == 0x71:  # BINPUT
                self.put(self.unsigned(1), at)
            elif op == 0x68:  # BINGET
                self.get(self.unsigned(1), at)
            elif op == 0x72:  # LONG_BINPUT
                self.put(self.unsigned(4), at)
            elif op == 0x6A:  # LONG_BINGET
                self.get(self.unsigned(4), at)
            elif op == 0x94:  # MEMOIZE
                self.put(len(self.memo), at)
            elif op == 0x58:  # BINUNICODE
                self.string(self.unsigned(4), "str", True)
            elif op == 0x8C:  # SHORT_BINUNICODE
                self.string(self.unsigned(1), "str", True)
            elif op == 0x8D:  # BINUNICODE8
                self.string(self.unsigned(8), "str", True)
            elif op in (0x54, 0x55):  # BINSTRING, SHORT_BINSTRING (Python 2 str; decoded as ASCII by pickle)
                self.string(self.unsigned(4 if op == 0x54 else 1), "str", True)
            elif op in (0x42, 0x43, 0x8E, 0x96):  # BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
                self.string(self.unsigned({0x42: 4, 0x43: 1}.get(op, 8)), "bytes", False)
            elif op == 0x4B:  # BININT1
                self.integer(1, signed=False)
            elif op == 0x4D:  # BININT2
                self.integer(2, signed=False)
            elif op == 0x4A:  # BININT
                self.integer(4)
            elif op == 0x8A:  # LONG1
                self.integer(self.unsigned(1))
            elif op == 0x8B:  # LONG4
                self.integer(self.unsigned(4))
            elif op == 0x47:  # BINFLOAT
                self.take(8, "a float")
                self.push(Node("float"))
            elif op in (0x88, 0x89):  # NEWTRUE, NEWFALSE
                self.push(Node("bool", int(op == 0x88)), 0)
            elif op == 0x4E:  # NONE
                self.push(Node("none"), 0)
            elif op == 0x28:  # MARK
                self.marks.append(len(self.stack))
            elif op == 0x29:  # EMPTY_TUPLE
                self.new_container("tuple", [])
            elif op in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
                items = [self.pop() for _ in range(op - 0x84)][::-1]
                self.new_container("tuple", items)
            elif op == 0x74:  # TUPLE
                self.new_container("tuple", self.pop_mark())
            elif op == 0x5D:  # EMPTY_LIST
                self.new_container("list", [])
            elif op == 0x6C:  # LIST
                self.new_container("list", self.pop_mark())
            elif op == 0x7D:  # EMPTY_DICT
                self.new_container("dict", [])
            elif op == 0x64:  # DICT
                items = self.pop_mark()
                node = Node("dict")
                self.set_items(node, items)
                self.push(node)
            elif op == 0x8F:  # EMPTY_SET
                self.new_container("set", [])
            elif op == 0x91:  # FROZENSET
                items = self.pop_mark()
                for item in items:
                    self.check_key(item)
                self.new_container("frozenset", items)
            elif op == 0x90:  # ADDITEMS
                items = self.pop_mark()
                target = self.top()
                if target.kind != "set":
                    raise self.fail(f"ADDITEMS on {describe(target)}", at)
                for item in items:
                    self.check_key(item)
                self.adopt(target, items)
            elif op == 0x61:  # APPEND
                value = self.pop()
                target = self.top()
                if target.kind != "list":
                    raise self.fail(f"APPEND on {describe(target)}", at)
                self.adopt(target, [value])
            elif op == 0x65:  # APPENDS
                items = self.pop_mark()
                target = self.top()
                if target.kind != "list":
                    raise self.fail(f"APPENDS on {describe(target)}", at)
                self.adopt(target, items)
            elif op == 0x73:  # SETITEM
                value, key = self.pop(), self.pop()
                self.set_items(self.top(), [key, value])
            elif op == 0x75:  # SETITEMS
                items = self.pop_mark()
                self.set_items(self.top(), items)
            elif op == 0x63:  # GLOBAL
                module = self.line()
                self.global_(module, self.line())
            elif op == 0x93:  # STACK_GLOBAL
                name, module = self.pop(), self.pop()
                if module.kind != "str" or name.kind != "str" or module.value is None or name.value is None:
                    raise self.fail("STACK_GLOBAL of something other than two short strings", at)
                self.global_(module.value, name.value)
            elif op == 0x52:  # REDUCE
                self.reduce(at)
            elif op == 0x62:  # BUILD
                self.build(at)
            elif op == 0x51:  # BINPERSID
                pid = self.pop()
                if pid.kind != "tuple":
                    raise self.fail(f"a persistent id that is {describe(pid)}", at)
                pid.frozen = True
                self.push(Node("storage"))
            elif op == 0x30:  # POP
                self.pop()
            elif op == 0x31:  # POP_MARK
                self.pop_mark()
            elif op == 0x32:  # DUP
                self.push(self.top(), 8)
            elif op == 0x80:  # PROTO
                if self.unsigned(1) > 5:
                    raise self.fail("an unknown pickle protocol", at)
            elif op == 0x95:  # FRAME
                size = self.unsigned(8)
                if size > len(data) - self.pos:
                    raise self.fail(f"a frame of {size} bytes, but only {len(data) - self.pos} remain", at)
            elif op == 0x2E:  # STOP
                if len(self.stack) != 1 or self.marks:
                    raise self.fail(f"STOP with {len(self.stack)} objects on the stack", at)
                return self.pos
            else:
                raise self.fail(f"opcode {bytes([op])!r} is not used by checkpoints and is refused", at)

    def put(self, index: int, at: int) -> None:
        if index > self.ops:
            raise self.fail(f"memo index {index} beyond the {self.ops} opcodes read", at)
        self.memo[index] = self.top()
        self.budget.charge(SLOT_BYTES, "the memo of the checkpoint pickle")

    def get(self, index: int, at: int) -> None:
        node = self.memo.get(index)
        if node is None:
            raise self.fail(f"memo index {index} was never stored", at)
        self.push(node, SLOT_BYTES)

    def reduce(self, at: int) -> None:
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

    def build(self, at: int) -> None:
        state = self.pop()
        target = self.top()
        # torch pickles a state dict's _metadata (versions per module) as the OrderedDict's attribute.
        if target.kind != "odict" or state.kind != "dict" or target.frozen or not state.keys or state.keys != {"_metadata"}:
            raise self.fail(f"BUILD on {describe(target)} with {describe(state)}; only an OrderedDict's _metadata is read", at)
        self.adopt(target, [state])
        target.count -= 1


def check_pickle(data, start: int, source: str, budget: LoadBudget, classify_global: Callable[[str, str], str]) -> int:
    """Validate the pickle that starts at `data[start]`; return where it ends (just after STOP).

    classify_global(module, name) returns "OrderedDict", "rebuild" or "storage" for an allowed
    global and raises WeightsError for any other. Raises WeightsError naming `source` for the rest.
    """
    return Scanner(data, start, source, budget, classify_global).run()
