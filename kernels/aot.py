"""Kernels built ahead of time: each Numba kernel compiled once into an object file, then loaded without numba.

Importing numba and starting its CPU target takes about a second, and numba loads a kernel from its
own cache only with both; a fresh process that classified one photo paid that on every run. Here each
kernel of a module (``cpu_kernels.py``), for the argument types of its first call, is compiled by numba's
ahead-of-time compiler (numba.pycc's ModuleCompiler: for this machine's CPU, no Python wrapper) into a
native object file in the kernel cache. Later processes link the object into memory with llvmlite's MCJIT
(a tenth of a second, no numba) and call it through ctypes, which releases the GIL while the kernel runs,
as numba's nogil dispatchers did.

The objects are keyed by the source of the kernels and of this file, the numba and llvmlite versions,
and the CPU as LLVM sees it (name and features): a change to any builds anew. A file's SHA-256, in its
header, is checked before LLVM reads it; a damaged file is built again. An object may refer only to
symbols every process has (libc's): the kernels allocate nothing and call none of numba's C helpers
(``cpu_kernels.py`` says how), and a build that refers to anything else is not kept. Where an object
cannot be built or loaded (no llvmlite, an object format other than ELF, such a symbol), the kernel
falls back to numba's JIT dispatcher (``cpu_kernels.compile_kernels``), as before this module; so does
one whose build fails unexpectedly (a numba whose AOT compiler has changed), with a warning.

Building takes a model's kernels about ten seconds of one core; by default (build mode "background",
below) a process does not wait for it: its backend runs the layer on NumPy while a builder process
builds the kernel into the cache.

A call goes through an entry point built beside each kernel (``_entry_point``): ctypes hands it each
array as the ndarray object itself, and it reads data, shape and strides out of NumPy's PyArrayObject
(``ARRAY_FIELDS``, checked in each process before use) and calls the kernel, with a return slot and
exception info on its own stack, in numba's native calling convention (numba.core.callconv.CPUCallConv): status = f(&return slot, &exception info, *arguments),
each array as the fields of numba's array struct (meminfo, parent, size, itemsize, data, shape...,
strides... in bytes), each boolean as a byte. The kernels return nothing: status 0 (or numba's
"returned None", -2) is success. Beside it, ``symbol_slots(int64 *slots)`` makes the same call with
each argument in one int64 slot (an array as its object's address): what a helper thread calls from
native code, without the GIL, for a share the caller recorded (``record_calls``, ``threads.py``).
"""
from __future__ import annotations

import contextlib
import ctypes
from array import array as _slots_array
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings

try:
    import fcntl
except ImportError:  # not POSIX: objects are not built here anyway (aot_supported)
    fcntl = None

import numpy as np

from npresnet.backends import build_mode, kernel_cache_dir

from . import BUILDING_IN_BACKGROUND, COMPILING, announce, scipy_hidden_from_numba

MAGIC = b"npresnet aot object 1\n"
# Symbols the linker provides, not a library: MCJIT's (RuntimeDyld's) own GOT for position-independent code.
_LINKER_SYMBOLS = {"_GLOBAL_OFFSET_TABLE_"}
_STATUS_OK = (0, -2)  # numba's RETCODE_OK and RETCODE_NONE
# LLVM argument types of the native function -> ctypes
_CTYPES = {"obj": ctypes.py_object, "i64": ctypes.c_int64, "i32": ctypes.c_int32, "i8": ctypes.c_int8,
           "i1": ctypes.c_bool, "f64": ctypes.c_double, "f32": ctypes.c_float}


class AotUnavailable(Exception):
    """This kernel cannot be built or loaded ahead of time here: use numba's JIT."""


class KernelNotReady(Exception):
    """The kernel this call needs has been handed to the background builder (Kernel.__call__ skips the call)."""


# --- argument types --------------------------------------------------------------------------------


def arg_code(a) -> tuple:
    """What a kernel is built for, for argument a: arrays by dtype, ndim and layout ('C' contiguous, else
    'A', any strides), scalars by kind and width."""
    if isinstance(a, np.ndarray):
        return ("array", a.dtype.str, a.ndim, "C" if a.flags.c_contiguous else "A")
    if isinstance(a, (bool, np.bool_)):
        return ("bool",)
    if isinstance(a, (int, np.integer)):
        return ("int", np.dtype(type(a)).str if isinstance(a, np.integer) else "<i8")
    if isinstance(a, (float, np.floating)):
        return ("float", np.dtype(type(a)).str if isinstance(a, np.floating) else "<f8")
    raise TypeError(f"a kernel argument of type {type(a).__name__}")


def _numba_type(code: tuple):
    from numba import from_dtype, types

    if code[0] == "array":
        return types.Array(from_dtype(np.dtype(code[1])), code[2], code[3])
    if code[0] == "bool":
        return types.boolean
    return from_dtype(np.dtype(code[1]))


def _llvm_type_code(t) -> str:
    """The _CTYPES code of a scalar argument's LLVM type."""
    from llvmlite import ir

    if isinstance(t, ir.IntType):
        return f"i{t.width}"
    if isinstance(t, ir.DoubleType):
        return "f64"
    if isinstance(t, ir.FloatType):
        return "f32"
    raise AotUnavailable(f"an argument of LLVM type {t}")


def _fields(codes) -> int:
    """How many native arguments the Python arguments of these codes become (arrays: 5 + 2*ndim)."""
    return sum(5 + 2 * c[2] if c[0] == "array" else 1 for c in codes)


# --- object files -------------------------------------------------------------------------------------


def undefined_symbols(obj: bytes) -> list[str]:
    """The symbols a 64-bit little-endian ELF object refers to without defining them (its symbol table's
    entries in section 0, SHN_UNDEF). Raises AotUnavailable for any other format."""
    if obj[:4] != b"\x7fELF" or obj[4:6] != b"\x02\x01":
        raise AotUnavailable("the object is not 64-bit little-endian ELF")
    (shoff,) = struct.unpack_from("<Q", obj, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
    # Section headers: (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    sections = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
    names = []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strings = sections[link][4]
        for entry in range(offset + entsize, offset + size, entsize):  # entry 0 is the null symbol
            name, _, _, shndx, _, _ = struct.unpack_from("<IBBHQQ", obj, entry)
            if shndx == 0 and name:
                names.append(obj[strings + name : obj.index(b"\0", strings + name)].decode())
    return names


@functools.lru_cache(maxsize=None)
def _process() -> ctypes.CDLL:
    return ctypes.CDLL(None)  # the symbols this process has


def _process_symbol(name: str) -> int | None:
    """The address of a C symbol this process already has (libc's, libm's), or None."""
    try:
        return ctypes.cast(getattr(_process(), name), ctypes.c_void_p).value
    except AttributeError:
        return None


def _pack(header: dict, obj: bytes) -> bytes:
    header = dict(header, sha256=hashlib.sha256(obj).hexdigest())
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + obj


def _unpack(data: bytes) -> tuple[dict, bytes]:
    """(header, object) of a file _pack wrote; ValueError if it is not one, or damaged."""
    if not data.startswith(MAGIC):
        raise ValueError("not an npresnet object file")
    end = data.index(b"\n", len(MAGIC))
    header = json.loads(data[len(MAGIC) : end])
    obj = data[end + 1 :]
    if hashlib.sha256(obj).hexdigest() != header.get("sha256"):
        raise ValueError("damaged: its SHA-256 does not match its header")
    return header, obj


def _read_object(path: str) -> tuple[dict, bytes]:
    """(header, object) of the file at path; OSError if there is none, ValueError if it is damaged."""
    with open(path, "rb") as f:
        return _unpack(f.read())


def _write_atomically(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- where the objects live -------------------------------------------------------------------------


def _module_file(module: str) -> str:
    spec = importlib.util.find_spec(module)  # found, not imported: the kernels' module imports numba
    if spec is None or not spec.origin:
        raise ImportError(f"no module {module}")
    return spec.origin


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


@functools.lru_cache(maxsize=None)
def source_key(module: str) -> str:
    """What every object of `module` is built from, short: its source, this file's, numba's and llvmlite's versions."""
    h = hashlib.sha256()
    for path in (_module_file(module), __file__):
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(f"numba {_version('numba')} llvmlite {_version('llvmlite')}".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _llvm():
    """llvmlite's binding layer, its native target ready (0.1 s; no numba)."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    return llvm


@functools.lru_cache(maxsize=None)
def _target_machine():
    """One target machine for emitting entry points and linking objects (PIC, as numba's AOT objects)."""
    return _llvm().Target.from_default_triple().create_target_machine(reloc="pic", opt=2)


@functools.lru_cache(maxsize=None)
def cpu_key() -> str:
    llvm = _llvm()
    cpu = f"{llvm.get_host_cpu_name()} {llvm.get_host_cpu_features().flatten()} simd {simd_bytes()}"
    return hashlib.sha256(cpu.encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=None)
def simd_bytes() -> int:
    """The width of the kernels' SIMD vectors in bytes: 64 where LLVM sees AVX-512F on this CPU, else 32
    (AVX2); $NPRESNET_SIMD_BYTES (32 or 64) overrides. The kernels are compiled with it and the weights
    packed for it (cpu.panel_width), in every process alike; the objects' CPU key includes it. On AMD's
    Zen 4, whose AVX-512 units are 256 bits wide inside, 64-byte vectors still ran resnet50's GEMMs in
    0.68-0.97x the time (half the instructions and loads per multiply-add: bench/results/notes.md)."""
    forced = os.environ.get("NPRESNET_SIMD_BYTES", "")
    if forced:
        if forced not in ("32", "64"):
            raise ValueError(f"NPRESNET_SIMD_BYTES must be 32 or 64, not {forced!r}")
        return int(forced)
    try:
        features = _llvm().get_host_cpu_features()
    except (ImportError, RuntimeError):  # no llvmlite (numba's JIT would not run either): the narrower width
        return 32
    return 64 if features.get("avx512f") else 32


def objects_dir(module: str) -> str:
    """The folder of `module`'s objects for this machine: <kernel cache>/aot/<source key>/<CPU key>."""
    return os.path.join(kernel_cache_dir(), "aot", source_key(module), cpu_key())


@functools.lru_cache(maxsize=None)
def declared_kernels(module: str) -> frozenset[str]:
    """The names of `module`'s @kernel functions, read from its source (not imported: it imports numba)."""
    with open(_module_file(module), encoding="utf-8") as f:
        return frozenset(re.findall(r"^@kernel\(.*\)\ndef (\w+)\(", f.read(), flags=re.MULTILINE))


def built_kernels(module: str) -> set[str]:
    """The kernels of `module` with at least one object built from their current source, on any CPU
    (found without llvmlite or numba: what backend "auto" reads to guess whether compiling lies ahead)."""
    root = os.path.join(kernel_cache_dir(), "aot", source_key(module))
    try:
        cpus = os.listdir(root)
    except OSError:
        return set()
    prefix = module.rsplit(".", 1)[-1] + "."
    return {
        name[len(prefix) :].split(".", 1)[0]
        for cpu in cpus
        for name in (os.listdir(os.path.join(root, cpu)) if os.path.isdir(os.path.join(root, cpu)) else ())
        if name.startswith(prefix) and name.endswith(".o")
    }


def _object_path(module: str, name: str, codes: tuple) -> str:
    signature = hashlib.sha256(repr(codes).encode()).hexdigest()[:12]
    return os.path.join(objects_dir(module), f"{module.rsplit('.', 1)[-1]}.{name}.{signature}.o")


# --- building ------------------------------------------------------------------------------------------


def build(module: str, name: str, codes: tuple) -> tuple[dict, bytes]:
    """Compile kernel `name` of `module` for arguments of these codes: (header, ELF object).

    Imports numba (and the kernels' module). Raises AotUnavailable where the object would need a
    symbol this process cannot give it."""
    with scipy_hidden_from_numba():  # numba imported (here, by the kernels' module) and started without SciPy
        kernels = importlib.import_module(module)
        from numba import types

        with warnings.catch_warnings():  # numba.pycc is "pending deprecation"; its compiler is what is used
            warnings.simplefilter("ignore")
            from numba.pycc.compiler import ExportEntry, ModuleCompiler

        py_func = kernels._KERNELS[module][name][0]
        signature = types.void(*(_numba_type(c) for c in codes))
        symbol = f"npresnet_{name}"
        compiler = ModuleCompiler([ExportEntry(symbol, signature, py_func)], f"npresnet_{name}", cpu_name="host")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.o")
            compiler.write_native_object(path, wrap=False)
            with open(path, "rb") as f:
                obj = f.read()
        function_type = compiler.context.call_conv.get_function_type(signature.return_type, signature.args)
    if len(function_type.args) != 2 + _fields(codes):
        raise AotUnavailable(f"{name}: {len(function_type.args)} native arguments, expected {2 + _fields(codes)}")
    entry, argtypes = _entry_point(symbol, function_type, codes)
    undefined = [s for s in undefined_symbols(obj) if s not in _LINKER_SYMBOLS]
    missing = [s for s in undefined if _process_symbol(s) is None]
    if missing:
        raise AotUnavailable(f"{name} refers to {', '.join(missing)}")
    header = {"kernel": name, "codes": repr(codes), "symbol": symbol + "_entry", "slots_symbol": symbol + "_slots", "argtypes": argtypes,
              "undefined": undefined, "kernel_bytes": len(obj)}
    return header, obj + entry


def _entry_point(symbol: str, function_type, codes) -> tuple[bytes, list[str]]:
    """An object file with `symbol`_entry(ret, exc, *arguments): each array argument the ndarray object
    itself, whose fields (data, shape, strides: NumPy's PyArrayObject, see ARRAY_FIELDS) it reads into the
    kernel's array arguments; the scalars as they are. With ctypes passing objects as they are, a call
    costs a few microseconds, as numba's own dispatch does (the fields, read in Python, cost ten times that).
    Returns the object and the entry's argument types (for ctypes)."""
    from llvmlite import ir

    i8p, i64 = ir.IntType(8).as_pointer(), ir.IntType(64)
    module = ir.Module(name=symbol + "_entry")
    kernel = ir.Function(module, function_type, name=symbol)
    params, argtypes, position = [], [], 2
    for code in codes:
        if code[0] == "array":
            params.append(i8p)
            argtypes.append("obj")
            position += 5 + 2 * code[2]
        else:
            params.append(function_type.args[position])
            argtypes.append(_llvm_type_code(function_type.args[position]))
            position += 1
    entry = ir.Function(module, ir.FunctionType(ir.IntType(32), params), name=symbol + "_entry")
    builder = ir.IRBuilder(entry.append_basic_block())

    def field(obj, offset, pointee):  # the pointer-sized field at `offset` bytes into the object
        address = builder.gep(obj, [ir.Constant(i64, offset)], source_etype=ir.IntType(8))
        return builder.load(builder.bitcast(address, pointee.as_pointer().as_pointer()), typ=pointee.as_pointer())

    kernel_types = iter(function_type.args)
    # The return slot (a kernel returns nothing, but numba's convention has the callee write it) and the
    # exception info: on this call's stack, so that concurrent calls never share them.
    ret, exc = builder.alloca(ir.ArrayType(i64, 4)), builder.alloca(i8p)
    args = [builder.bitcast(ret, next(kernel_types)), builder.bitcast(exc, next(kernel_types))]
    for code, param in zip(codes, entry.args):
        if code[0] != "array":
            args.append(param)
            next(kernel_types)
            continue
        meminfo, parent, _, _, data_type = (next(kernel_types) for _ in range(5))
        ndim = code[2]
        dims, strides = field(param, ARRAY_FIELDS["dimensions"], i64), field(param, ARRAY_FIELDS["strides"], i64)
        shape = [builder.load(builder.gep(dims, [ir.Constant(i64, k)], source_etype=i64), typ=i64) for k in range(ndim)]
        stride = [builder.load(builder.gep(strides, [ir.Constant(i64, k)], source_etype=i64), typ=i64) for k in range(ndim)]
        size = ir.Constant(i64, 1)
        for extent in shape:
            size = builder.mul(size, extent)
        data = builder.bitcast(field(param, ARRAY_FIELDS["data"], ir.IntType(8)), data_type)
        args += [ir.Constant(meminfo, None), ir.Constant(parent, None), size, ir.Constant(i64, np.dtype(code[1]).itemsize), data]
        args += shape + stride
        for _ in range(2 * ndim):
            next(kernel_types)
    builder.ret(builder.call(kernel, args))
    # The same call with every argument in one i64 slot (an array as its object's address, a scalar as its
    # value or bits), for a helper thread that runs a share's calls natively, without the GIL (threads.py).
    slots = ir.Function(module, ir.FunctionType(ir.IntType(32), [i64.as_pointer()]), name=symbol + "_slots")
    builder = ir.IRBuilder(slots.append_basic_block())
    values = []
    for k, param in enumerate(entry.args):
        value = builder.load(builder.gep(slots.args[0], [ir.Constant(i64, k)], source_etype=i64), typ=i64)
        if isinstance(param.type, ir.PointerType):
            value = builder.inttoptr(value, param.type)
        elif isinstance(param.type, ir.IntType):
            value = builder.trunc(value, param.type) if param.type.width < 64 else value
        elif isinstance(param.type, ir.DoubleType):
            value = builder.bitcast(value, param.type)
        else:  # float: its bits in the slot's low half
            value = builder.bitcast(builder.trunc(value, ir.IntType(32)), param.type)
        values.append(value)
    builder.ret(builder.call(entry, values))
    ir_module = _llvm().parse_assembly(str(module))
    ir_module.verify()
    return _target_machine().emit_object(ir_module), argtypes


# --- loading and calling -------------------------------------------------------------------------------

# NumPy's PyArrayObject (numpy/ndarraytypes.h, PyArrayObject_fields), after CPython's 16-byte object
# header: the same in NumPy 1.x and 2.x. array_fields_ok checks it in this process before any entry reads it.
ARRAY_FIELDS = {"data": 16, "dimensions": 32, "strides": 40}


@functools.lru_cache(maxsize=None)
def array_fields_ok() -> bool:
    a = np.zeros((3, 4, 5), dtype=np.float32)[1:, ::2, 1:]

    def word(offset):
        return ctypes.c_void_p.from_address(id(a) + offset).value

    def ints(address, n):
        return list((ctypes.c_int64 * n).from_address(address))

    return (
        word(ARRAY_FIELDS["data"]) == a.ctypes.data
        and ints(word(ARRAY_FIELDS["dimensions"]), 3) == list(a.shape)
        and ints(word(ARRAY_FIELDS["strides"]), 3) == list(a.strides)
    )


# Kernel calls begun in this process, counted (from every thread, so approximately) for threads.Helpers.
KERNEL_ENTRIES = np.zeros(8, dtype=np.int64)  # [0] counts; a cache line of its own
_engines: list = []  # every MCJIT engine holds its kernel's code: kept for the life of the process


def load(header: dict, obj: bytes) -> tuple[int, int]:
    """Link the object into this process (its own MCJIT engine, so that objects never clash): the
    addresses of the kernel's entry point and of its slots form (_entry_point)."""
    llvm = _llvm()
    for symbol in header["undefined"]:
        address = _process_symbol(symbol)
        if address is None:
            raise AotUnavailable(f"{header['kernel']} refers to {symbol}, which this process lacks")
        llvm.add_symbol(symbol, address)
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), _target_machine())
    kernel_bytes = header["kernel_bytes"]
    for part in (obj[:kernel_bytes], obj[kernel_bytes:]):  # the kernel, then its entry point
        engine.add_object_file(llvm.ObjectFileRef.from_data(part))
    engine.finalize_object()
    addresses = tuple(engine.get_function_address(header[key]) for key in ("symbol", "slots_symbol"))
    if not all(addresses):
        raise AotUnavailable(f"{header['kernel']}: no symbol {header['symbol']} or {header['slots_symbol']} in its object")
    _engines.append(engine)
    return addresses


def compile_ir(text: str, names: list[str]) -> dict[str, int]:
    """Compile a module written in LLVM IR for this CPU into this process (no numba): each named
    function's address. For the few lines of code no kernel can be (threads.py's spin-waits)."""
    llvm = _llvm()
    module = llvm.parse_assembly(text)
    module.verify()
    engine = llvm.create_mcjit_compiler(module, _target_machine())
    engine.finalize_object()
    _engines.append(engine)
    return {name: engine.get_function_address(name) for name in names}


def native_call(name: str, addresses: tuple[int, int], argtypes: list[str]):
    """call(args) for the entry point at addresses[0]: arrays passed as the objects they are (the entry
    reads their fields), scalars converted by ctypes, the GIL released for the call. call.slots is the
    address of the same call's slots form (addresses[1]), call.argtypes its arguments' codes: what
    record_calls needs to prepare a call that a helper thread makes natively."""
    function = ctypes.CFUNCTYPE(ctypes.c_int32, *(_CTYPES[t] for t in argtypes))(addresses[0])

    def call(args):
        try:
            status = function(*args)
        except ctypes.ArgumentError:  # a NumPy scalar ctypes does not take (np.bool_, np.float32): as Python's
            status = function(*(a.item() if isinstance(a, np.generic) else a for a in args))
        if status not in _STATUS_OK:
            raise RuntimeError(f"npresnet kernel {name} failed (numba status {status})")

    call.slots, call.argtypes = addresses[1], argtypes
    return call


# --- recording: a share's kernel calls prepared for a helper thread to make without the GIL -------------

_recording = threading.local()  # .calls: the list this thread's kernel calls go to instead (record_calls)


class NotRecordable(Exception):
    """A kernel call that a helper cannot make natively: numba's JIT serves the kernel, it is still being
    built (NotYetBuilt), or an argument is neither an array nor an integer."""


class NotYetBuilt(NotRecordable):
    """A kernel call that cannot be recorded until the kernel's background build has ended."""


@contextlib.contextmanager
def record_calls():
    """``with record_calls() as calls:`` the kernel calls this thread makes in the block are not made but
    prepared, in order, into `calls`: each (slots function address, slots, arguments), the slots an
    array.array of int64 (an array argument as its object's address, an integer as its value) and the
    arguments kept with them, so that the arrays live as long as the prepared call. Raises NotRecordable
    at the first call that cannot be prepared. Only for code whose Python does nothing with what its
    kernels write: the calls run later, elsewhere (threads.NativeShare)."""
    calls: list = []
    outer = getattr(_recording, "calls", None)  # a block within another records apart, then the outer goes on
    _recording.calls = calls
    try:
        yield calls
    finally:
        _recording.calls = outer


def _prepare(call, args) -> tuple:
    slots_function = getattr(call, "slots", None)
    if slots_function is None:
        raise NotRecordable("a kernel served by numba's JIT")
    values = []
    for arg, code in zip(args, call.argtypes):
        if code == "obj":
            values.append(id(arg))  # the object's address, as ctypes' py_object passes it
        elif code[0] == "i" and isinstance(arg, (int, np.integer, np.bool_)):
            values.append(int(arg))
        else:
            raise NotRecordable(f"an argument {arg!r} for a slot of type {code}")
    return slots_function, _slots_array("q", values), args


def aot_supported() -> bool:
    """Whether objects can be built and loaded here: ELF objects (Linux), llvmlite installed."""
    return sys.platform.startswith("linux") and importlib.util.find_spec("llvmlite") is not None


# --- building in the background --------------------------------------------------------------------
#
# Compiling a model's kernels takes a single core about ten seconds (numba's start and LLVM's optimiser);
# a first run that waited for it was twelve times slower than one on the NumPy backend. In build mode
# "background" (the default) a kernel that is not in the cache, called within a DeferredBuilds block, is
# handed to a builder process and the call skipped; the block's caller (the numba backend) does that step
# with the NumPy reference meanwhile. Each later call looks for the object again and loads it once it is
# there. The builder outlives its parent if it must: what it was asked for ends up in the cache for the
# next process (a file is written whole or not at all, and a lock per object keeps two builders from
# building one object twice). NPRESNET_KERNEL_BUILD=wait (backends.build_mode) builds in the calling
# process instead, before the call returns (benchmarks, and the tests of the kernels themselves).

_deferring = threading.local()  # .depth: how many DeferredBuilds blocks this thread is inside
_skipped_calls = 0  # kernel calls skipped, in this process, because their kernel was being built (under _specialising)


class DeferredBuilds:
    """``with DeferredBuilds() as deferred: ...``: in build mode "background", a kernel this thread calls
    within the block that is not in the cache is sent to the builder and the call skipped: its outputs
    are left unwritten, and deferred.skipped() says so afterwards, when the caller does the whole step
    another way. The backend's helper threads enter a block of their own for the shares of a deferring
    caller (cpu.py's _split). Kernels called outside any block are built before they run ("wait"),
    whatever other threads do meanwhile."""

    def __enter__(self):
        _deferring.depth = getattr(_deferring, "depth", 0) + 1
        self._before = _skipped_calls
        return self

    def __exit__(self, *exc):
        _deferring.depth -= 1
        self._after = _skipped_calls

    def skipped(self) -> bool:
        """Whether some kernel call was skipped meanwhile (this block's, or another deferring thread's:
        at worst a step done the slow way once more)."""
        return self._after != self._before


def deferring() -> bool:
    """Whether this thread is inside a DeferredBuilds block."""
    return getattr(_deferring, "depth", 0) > 0


def build_into(module: str, name: str, codes: tuple, path: str) -> tuple[dict, bytes]:
    """The object at `path` (kernel `name` of `module` for these codes): built and written there atomically,
    unless another process built it meanwhile (one builds while the others wait on the object's lock)."""
    lock = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = open(path + ".lock", "a")
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError:  # a read-only cache: build without the lock (and keep the build in memory)
        pass
    try:
        try:
            return _read_object(path)
        except (OSError, ValueError):
            pass
        header, obj = build(module, name, codes)
        try:
            _write_atomically(path, _pack(header, obj))
        except OSError:
            pass  # a read-only cache: this process keeps its build
        return header, obj
    finally:
        if lock is not None:
            # Gone before it is released: whoever locks it, or a new one, afterwards finds the object written.
            with contextlib.suppress(OSError):
                os.unlink(path + ".lock")
            lock.close()  # releases the lock


class _Builder:
    """This process's builder: a child process (``serve_builds``) that builds what it is sent, one
    request a line, and exits when it has been idle for BUILDER_IDLE_S or its input ends, having built all
    it read. request() says whether an object is (still) being built."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.sent: dict[str, subprocess.Popen] = {}  # object path -> the builder asked for it

    def request(self, module: str, name: str, codes: tuple, path: str) -> bool:
        """Ask for the object at `path` (once); True while the builder asked for it still runs, False
        where it could not be asked or has ended without the object (a failed build: the caller builds
        in its own process, which reports why)."""
        asked = self.sent.get(path)
        if asked is not None:
            return asked.poll() is None
        line = json.dumps({"module": module, "name": name, "codes": codes, "path": path}) + "\n"
        for _ in range(2):  # a builder that has just exited, idle, is replaced once
            if self.process is None or self.process.poll() is not None:
                self.process = self._start()
                if self.process is None:
                    return False
            try:
                self.process.stdin.write(line.encode())
                self.process.stdin.flush()
            except OSError:  # it exited before reading this (a broken pipe)
                self.process.wait()
                continue
            self.sent[path] = self.process
            return True
        return False

    @staticmethod
    def _start() -> subprocess.Popen | None:
        """A new builder: this Python, this process's module path; None where that cannot be (a frozen
        application, whose executable is not a Python)."""
        if getattr(sys, "frozen", False) or not sys.executable:
            return None
        log = os.path.join(kernel_cache_dir(), "aot", "builder.log")
        env = {**os.environ, "NPRESNET_KERNEL_BUILD": "wait", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(log, "ab") as err:
                process = subprocess.Popen(
                    [sys.executable, "-c", "from npresnet_kernels.aot import serve_builds; serve_builds()"],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, close_fds=True, env=env,
                )
        except OSError:
            return None
        if _PROCESS_CPUS:  # not the CPU of the (pinned: cpu.py) thread that started it
            with contextlib.suppress(OSError):
                os.sched_setaffinity(process.pid, _PROCESS_CPUS)
        return process

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every builder this process asked has finished (True), or timeout seconds (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for process in {id(p): p for p in self.sent.values()}.values():
            if process.stdin and not process.stdin.closed:
                try:
                    process.stdin.close()  # no more requests: it exits once it has built what it read
                except OSError:
                    pass
            try:
                process.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True


_builder = _Builder()
# The CPUs this process may run on, as it started: the builder's, whichever of the backend's pinned
# threads starts it.
_PROCESS_CPUS = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
BUILDER_IDLE_S = 2.0


def wait_for_builds(timeout: float | None = None) -> bool:
    """Block until the kernels this process has asked the background builder for are built (True), or
    for at most timeout seconds (False). Calls after this load them."""
    return _builder.wait(timeout)


def serve_builds(idle_s: float | None = None) -> None:
    """The builder's main loop: read requests (JSON lines: module, name, codes, path) from standard input
    and build each into its path (build_into), until the input ends or none has come for idle_s seconds.
    A request that fails is reported on standard error (the cache's aot/builder.log) and skipped."""
    idle_s = BUILDER_IDLE_S if idle_s is None else idle_s
    fd, pending = sys.stdin.fileno(), b""
    while True:
        while b"\n" not in pending:
            if not select.select([fd], [], [], idle_s)[0]:
                return
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return  # the input ended: everything sent has been read (and built)
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        try:
            request = json.loads(line)
            codes = tuple(tuple(c) for c in request["codes"])
            build_into(request["module"], request["name"], codes, request["path"])
        except Exception as exc:  # noqa: BLE001 (one bad request must not stop the others)
            print(f"npresnet kernel builder: {line.decode(errors='replace')}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


# Held while any kernel is specialised (built, loaded or handed to the JIT): the pool's threads meet a new
# specialisation together, and LLVM's state (llvmlite's global context, new MCJIT engines) is not
# thread-safe outside numba's own compiler lock, which covers only numba's compiling.
_specialising = threading.RLock()


class Kernel:
    """One kernel of a module, callable as its numba dispatcher was: specialised on the codes of its
    arguments, each specialisation loaded from the kernel cache, else built and cached, else (where
    that cannot be done) numba's JIT dispatcher."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        self.calls: dict[tuple, object] = {}  # by the quick key of __call__
        self.specialisations: dict[tuple, object] = {}  # by arg_code's codes (int and np.int64 share one)

    def __call__(self, *args):
        # What arg_code tells apart, told apart faster (this runs on every call), if more finely.
        key = tuple([(a.dtype, a.ndim, a.flags.c_contiguous) if isinstance(a, np.ndarray) else type(a) for a in args])
        call = self.calls.get(key)
        if call is None:
            with _specialising:
                codes = tuple(map(arg_code, args))
                try:
                    call = self.specialisations.get(codes) or self._specialise(codes)
                except KernelNotReady:  # being built: skipped, and counted for the deferring caller
                    if getattr(_recording, "calls", None) is not None:
                        raise NotYetBuilt(f"{self.name}, still being built") from None
                    global _skipped_calls
                    _skipped_calls += 1
                    return
                self.calls[key] = self.specialisations[codes] = call
        recorded = getattr(_recording, "calls", None)
        if recorded is not None:
            recorded.append(_prepare(call, args))
            return
        KERNEL_ENTRIES[0] += 1  # for threads.py: a thread is about to let go of the GIL
        call(args)

    def _specialise(self, codes):
        if aot_supported() and array_fields_ok():
            try:
                return self._native(codes)
            except AotUnavailable:
                pass
            except KernelNotReady:
                raise
            except Exception as exc:  # e.g. a numba whose AOT compiler differs: the JIT still serves
                logging.getLogger("npresnet").warning(
                    "npresnet: kernel %s could not be built ahead of time (%s: %s); using numba's JIT",
                    self.name, type(exc).__name__, exc,
                )
        dispatcher = getattr(importlib.import_module(self.module).compile_kernels(self.module), self.name)
        return lambda args: dispatcher(*args)

    def _native(self, codes):
        path = _object_path(self.module, self.name, codes)
        try:
            header, obj = _read_object(path)
        except (OSError, ValueError):  # not built yet, or damaged: build it
            if deferring() and build_mode() == "background" and _builder.request(self.module, self.name, codes, path):
                announce(BUILDING_IN_BACKGROUND, kernel_cache_dir())
                raise KernelNotReady(self.name) from None
            announce(COMPILING, kernel_cache_dir())
            header, obj = build_into(self.module, self.name, codes, path)
        return native_call(self.name, load(header, obj), header["argtypes"])


class KernelTable:
    """The kernels of a module (``table.gemm_packed(...)``), each a Kernel, all made at once (the pool's
    threads meet a kernel together at its first call: each must find the same one)."""

    def __init__(self, module: str):
        for name in declared_kernels(module):
            setattr(self, name, Kernel(module, name))


@functools.lru_cache(maxsize=None)
def kernel_table(module: str) -> KernelTable:
    """The one KernelTable of `module` in this process."""
    return KernelTable(module)
