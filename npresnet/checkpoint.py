"""Reading PyTorch checkpoints (.pth) and .safetensors files without torch, and without running their code.

A ``.pth`` file is a pickle whose tensors point into raw storages kept beside it:
in the zip format (``torch.save`` since 1.6) the pickle is ``<name>/data.pkl``
and storage ``k`` is ``<name>/data/k``; in the legacy format
(``_use_new_zipfile_serialization=False``) four pickles (magic number,
protocol version, system info, the object) are followed by a pickled list of
storage keys and, for each key in that order, an int64 element count and the
raw bytes.

Security: the pickle is read by ``RestrictedUnpickler``, whose ``find_class``
is the only way a pickle can reach a callable (GLOBAL, STACK_GLOBAL, INST,
OBJ and EXT opcodes all go through it). It hands back this module's own
tensor rebuilders and ``collections.OrderedDict`` for an allowlist of names,
and refuses every other global before anything is called, so a checkpoint
that pickles ``os.system`` or ``builtins.eval`` fails at that opcode. Every
tensor is checked against its storage (dtype, shape, strides, offset inside the
bytes actually present) before a view is taken, so a lying or truncated file is
an error, never an out-of-bounds read.

Hostile files: before the unpickler sees a pickle, ``pickle_scan.check_pickle`` walks its opcodes
with bounds of its own (lengths, memo indices, nesting, container sizes, key types, BUILD), and
everything a file makes the reader allocate (members as they inflate, storages, the copied-out
tensors, the pickle's objects) is charged to one ``archive.LoadBudget``, capped at 4 x the file
size + 64 MiB unless ``max_bytes`` or ``$NPRESNET_MAX_LOAD_BYTES`` says otherwise. A tensor's
view is copied once however many keys alias it; distinct views of one storage (stride 0,
overlapping) are each charged, so a small file cannot expand into gigabytes.

``.safetensors``: an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, data_offsets), then the raw little-endian data;
offsets and sizes are checked the same way.

References: PyTorch ``torch/serialization.py`` (``_save``, ``_legacy_save``,
``_load``, ``_legacy_load``) and ``torch/_utils.py`` (``_rebuild_tensor_v2``);
``torch/_weights_only_unpickler.py`` (the same idea inside torch);
the Python ``pickle`` docs, "Restricting Globals"; the safetensors format
(https://github.com/huggingface/safetensors, README "Format").
"""
from __future__ import annotations

import collections
import io
import json
import pickle
import struct
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from .archive import LoadBudget, open_zip, read_member
from .errors import WeightsError
from .pickle_scan import check_pickle

BFLOAT16 = "bfloat16"  # NumPy has no bfloat16: stored as uint16 and widened to float32 when read

# torch.<name> storage classes -> element dtype.
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": BFLOAT16,
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}

SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": BFLOAT16,
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit
SAFETENSORS_HEADER_OBJECT_BYTES = 16  # parsed JSON costs about this many bytes of memory per header byte
MAX_NDIM = 32  # NumPy allows 64; a checkpoint's tensors have a handful
MAX_DIM = 1 << 48


# Named tuples, not dataclasses: a pickle's BUILD opcode finds no __dict__, no __setstate__ and no
# settable attribute on them, so it cannot alter a storage, nor the shared allowlist entries.
class StorageType(NamedTuple):
    """What a pickled ``torch.FloatStorage`` (etc.) global becomes: only its element dtype."""

    name: str
    dtype: str


class Storage(NamedTuple):
    """One storage's raw little- or big-endian bytes, shared by every tensor that views it."""

    key: str
    dtype: str
    data: bytes | bytearray | memoryview
    byteorder: str  # "<" or ">"
    source: str  # the file, for messages
    views: "Views"  # the load this storage belongs to


class Views:
    """One load's tensors, by (storage, offset, size, stride): an alias is the same array, not another copy."""

    def __init__(self, budget: LoadBudget):
        self.budget = budget
        self.arrays: dict[tuple, np.ndarray] = {}


def _numpy_dtype(dtype: str, byteorder: str = "<") -> np.dtype:
    base = np.dtype(np.uint16) if dtype == BFLOAT16 else np.dtype(dtype)
    return base.newbyteorder(byteorder) if base.itemsize > 1 else base


def _widen(array: np.ndarray, dtype: str) -> np.ndarray:
    """A native-endian copy; bfloat16 (the top half of a float32) widened exactly to float32."""
    if dtype == BFLOAT16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.dtype(dtype), copy=True)


def _is_shape(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) <= MAX_NDIM and all(type(v) is int and -MAX_DIM < v < MAX_DIM for v in value)


def strided_view(
    data, dtype: str, byteorder: str, offset: int, size: tuple, stride: tuple, what: str, budget: LoadBudget | None = None
) -> np.ndarray:
    """Elements [offset + sum(i_k * stride_k)] of `data` as a new array of shape `size`, checked to lie inside `data`.

    Raises WeightsError (naming `what`) for a negative size, stride or offset, mismatched ranks,
    more than MAX_NDIM dimensions, any element beyond the bytes present, or a copy that would take
    `budget` past its cap (a stride-0 or overlapping view can be far larger than its storage).
    """
    if type(offset) is not int or not _is_shape(size) or not _is_shape(stride):
        raise WeightsError(
            f"{what}: malformed tensor metadata (offset a {type(offset).__name__}, size a {type(size).__name__} "
            f"and stride a {type(stride).__name__}: expected an int and tuples of at most {MAX_NDIM} ints)"
        )
    if len(size) != len(stride):
        raise WeightsError(f"{what}: size {size} and stride {stride} have different lengths")
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise WeightsError(f"{what}: negative offset, size or stride (offset {offset}, size {size}, stride {stride})")
    itemsize = _numpy_dtype(dtype).itemsize
    numel = len(data) // itemsize
    out_dtype = np.dtype(np.float32) if dtype == BFLOAT16 else np.dtype(dtype)
    count = 1
    for n in size:
        count *= n
    if budget is not None:
        budget.charge(count * out_dtype.itemsize, f"tensor of size {size} ({what})")
    if count == 0:
        return np.zeros(size, dtype=out_dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= numel:
        raise WeightsError(
            f"{what}: tensor of size {size}, stride {stride}, offset {offset} reaches element {last}, "
            f"but its storage holds only {numel} {dtype} elements (truncated or corrupt file)"
        )
    flat = np.frombuffer(data, dtype=_numpy_dtype(dtype, byteorder), count=numel)
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return _widen(view, dtype)


# --- the restricted unpickler -------------------------------------------------------------


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> np.ndarray:
    """Stands in for torch._utils._rebuild_tensor / _rebuild_tensor_v2: the view, copied out of its storage once.

    The ignored arguments are requires_grad, backward_hooks and metadata, which
    mean nothing for inference.
    """
    if not isinstance(storage, Storage):
        raise WeightsError(f"malformed checkpoint: a tensor's storage is a {type(storage).__name__}, not a storage record")
    key = (storage.key, storage_offset, size, stride)
    try:
        found = storage.views.arrays.get(key)
    except TypeError:  # unhashable metadata: strided_view says what is wrong with it
        found = None
    if found is None:
        found = strided_view(
            storage.data, storage.dtype, storage.byteorder, storage_offset, size, stride,
            f"{storage.source}: storage {storage.key!r}", storage.views.budget,
        )
        storage.views.arrays[key] = found
    return found


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored) -> np.ndarray:
    """Stands in for torch._utils._rebuild_parameter (a state dict saved with keep_vars=True)."""
    if not isinstance(data, np.ndarray):
        raise WeightsError(f"a parameter's data is {type(data).__name__}, not a tensor")
    return data


class Rebuilder(NamedTuple):
    """An allowed callable, wrapped so that a pickle's BUILD opcode cannot alter it (a function's
    __defaults__ or __dict__ could be set; a named tuple has nothing settable)."""

    function: Callable[..., Any]

    def __call__(self, *args):
        return self.function(*args)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,  # a built-in type: nothing settable either
    ("torch._utils", "_rebuild_tensor"): Rebuilder(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): Rebuilder(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): Rebuilder(_rebuild_parameter),
    ("torch.storage", "UntypedStorage"): StorageType("UntypedStorage", "uint8"),
    ("torch", "UntypedStorage"): StorageType("UntypedStorage", "uint8"),
    **{("torch", name): StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
}


def _refusal(source: str, module: str, name: str) -> WeightsError:
    return WeightsError(
        f"{source}: refused to unpickle global {module:.100}.{name:.100}: a checkpoint may hold only tensors "
        f"and plain containers (save model.state_dict(), not the model or other objects)"
    )


def _global_kind(source: str):
    """What check_pickle needs to know of a global: OrderedDict, a rebuild function or a storage type."""

    def classify(module: str, name: str) -> str:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise _refusal(source, module, name)
        if found is collections.OrderedDict:
            return "OrderedDict"
        return "rebuild" if isinstance(found, Rebuilder) else "storage"

    return classify


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and tensors only; `load_storage(key, dtype)` supplies storage bytes."""

    def __init__(self, file, load_storage, source: str):
        super().__init__(file)
        self._load_storage = load_storage
        self._source = source
        self._storages: dict[str, Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _refusal(self._source, module, name) from None

    def persistent_load(self, pid):
        # zip: ('storage', type, key, location, numel); legacy adds view_metadata (None since torch 1.x).
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise WeightsError(f"{self._source}: unexpected persistent id ({_describe(pid)})")
        storage_type, key = pid[1], pid[2]
        if not isinstance(storage_type, StorageType) or not isinstance(key, str) or len(key) > 256:
            raise WeightsError(f"{self._source}: malformed storage record ({_describe(pid)})")
        if len(pid) == 6 and pid[5] is not None:
            raise WeightsError(f"{self._source}: storage views (pre-1.0 legacy format) are not supported")
        if key not in self._storages:
            self._storages[key] = self._load_storage(key, storage_type.dtype)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:
            raise WeightsError(
                f"{self._source}: storage {key!r} is used as both {storage.dtype} and {storage_type.dtype}"
            )
        return storage


def _describe(value: Any) -> str:
    """An untrusted value in words: its type and length, never its repr (which could be huge or slow)."""
    if isinstance(value, (tuple, list, dict, str, bytes)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


# --- the two .pth formats ---------------------------------------------------------------


def _read_zip_checkpoint(path: Path, source: str, budget: LoadBudget):
    archive = open_zip(path, source)
    with archive:
        infos = {info.filename: info for info in archive.infolist()}
        names = list(infos)
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise WeightsError(
                f"{source}: a TorchScript archive (torch.jit.save), not a state dict; "
                f"in torch, save model.state_dict() with torch.save instead"
            )
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            raise WeightsError(f"{source}: a zip archive but not a PyTorch checkpoint (no <name>/data.pkl)")
        if len(pickles) > 1:
            raise WeightsError(f"{source}: several checkpoints in one archive: {', '.join(pickles[:4])}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "<"
        if f"{prefix}byteorder" in infos:
            order = bytes(read_member(archive, infos[f"{prefix}byteorder"], budget, source)[:16]).decode("ascii", "replace")
            if order.strip() not in ("little", "big"):
                raise WeightsError(f"{source}: unknown byteorder (not 'little' or 'big')")
            byteorder = "<" if order.strip() == "little" else ">"
        views = Views(budget)

        def load_storage(key: str, dtype: str) -> Storage:
            member = f"{prefix}data/{key}"
            if member not in infos:
                raise WeightsError(f"{source}: storage {member} is missing from the archive")
            return Storage(key, dtype, read_member(archive, infos[member], budget, source), byteorder, source, views)

        data_pkl = read_member(archive, infos[pickles[0]], budget, source)
        return _unpickle_from(data_pkl, 0, load_storage, source, budget)


def _read_legacy_checkpoint(path: Path, source: str, budget: LoadBudget):
    budget.charge(path.stat().st_size, "the file")
    raw = path.read_bytes()

    def no_storage(key, dtype):
        raise WeightsError(f"{source}: unexpected storage reference in the checkpoint header")

    magic, pos = _unpickle_from(raw, 0, no_storage, source, budget, keep_position=True)
    if magic != LEGACY_MAGIC_NUMBER:
        raise WeightsError(f"{source}: not a PyTorch checkpoint (neither a zip archive nor the legacy format)")
    version, pos = _unpickle_from(raw, pos, no_storage, source, budget, keep_position=True)
    if version != LEGACY_PROTOCOL_VERSION:
        raise WeightsError(f"{source}: unsupported legacy checkpoint protocol")
    sys_info, pos = _unpickle_from(raw, pos, no_storage, source, budget, keep_position=True)
    byteorder = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"
    views = Views(budget)

    # The object refers to storages whose bytes come after it: record the references, fill them in afterwards.
    pending: dict[str, Storage] = {}

    def defer_storage(key: str, dtype: str) -> Storage:
        pending[key] = Storage(key, dtype, b"", byteorder, source, views)
        return pending[key]

    # Tensors need their bytes at rebuild time, so read the object twice: first to learn the keys
    # and find where the storages start, then with the bytes in hand.
    start = pos
    _, pos = _unpickle_from(raw, start, defer_storage, source, budget, tensors=False, keep_position=True)
    object_end = pos
    keys, pos = _unpickle_from(raw, pos, no_storage, source, budget, keep_position=True)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise WeightsError(f"{source}: malformed storage key list")
    if sorted(keys) != sorted(pending):
        raise WeightsError(f"{source}: the stored storages are not the ones the tensors use")
    storages: dict[str, Storage] = {}
    data = memoryview(raw)
    for key in keys:
        if pos + 8 > len(raw):
            raise WeightsError(f"{source}: truncated: storage {key[:100]!r} is missing")
        (numel,) = struct.unpack("<q" if byteorder == "<" else ">q", raw[pos : pos + 8])
        pos += 8
        dtype = pending[key].dtype
        nbytes = numel * _numpy_dtype(dtype).itemsize
        if numel < 0 or nbytes > len(raw) - pos:
            raise WeightsError(
                f"{source}: truncated: storage {key[:100]!r} claims {numel} {dtype} elements, "
                f"but only {len(raw) - pos} bytes remain"
            )
        storages[key] = Storage(key, dtype, data[pos : pos + nbytes], byteorder, source, views)  # no copy
        pos += nbytes
    return _unpickle_from(raw, start, lambda key, dtype: storages[key], source, budget, checked_end=object_end)


def _unpickle_from(raw, start: int, load_storage, source: str, budget: LoadBudget, tensors: bool = True,
                   keep_position: bool = False, checked_end: int | None = None):
    """The pickle at raw[start:], checked by check_pickle first (unless checked_end says where an
    earlier check found it to end); with keep_position, (object, where it ended)."""
    end = check_pickle(raw, start, source, budget, _global_kind(source)) if checked_end is None else checked_end
    unpickler = RestrictedUnpickler(io.BytesIO(memoryview(raw)[start:end]), load_storage, source)
    if not tensors:
        # First pass over a legacy object: storages are empty placeholders, so skip the views.
        unpickler.find_class = _find_class_without_views(unpickler)
    try:
        found = unpickler.load()
    except WeightsError as exc:
        if not str(exc).startswith(source):  # raised by a rebuild function, which does not know the file
            raise WeightsError(f"{source}: {exc}") from None
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, RecursionError, UnicodeDecodeError, OverflowError) as exc:
        raise WeightsError(f"{source}: corrupt checkpoint pickle ({type(exc).__name__}: {str(exc)[:200]})") from None
    return (found, end) if keep_position else found


def _find_class_without_views(unpickler: RestrictedUnpickler):
    checked = unpickler.find_class

    def find_class(module, name):
        found = checked(module, name)
        return Rebuilder(lambda *args: None) if isinstance(found, Rebuilder) else found

    return find_class


def _file_budget(path: Path, max_bytes: int | None) -> LoadBudget:
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    return LoadBudget(str(path), path.stat().st_size, max_bytes)


def read_torch_checkpoint(path: str | Path, max_bytes: int | None = None) -> Any:
    """The object a .pth file holds, tensors as NumPy arrays (bfloat16 widened to float32).

    Raises WeightsError for a refused global, a truncated, corrupt or hostile file, tensor
    metadata that does not fit its storage, or a load that would allocate more than
    `max_bytes` (default: 4 x the file size + 64 MiB, or $NPRESNET_MAX_LOAD_BYTES).
    """
    path = Path(path)
    source = str(path)
    budget = _file_budget(path, max_bytes)
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        return _read_zip_checkpoint(path, source, budget)
    if head[:1] != b"\x80":
        raise WeightsError(f"{source}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    return _read_legacy_checkpoint(path, source, budget)


# --- .safetensors -------------------------------------------------------------------------


def read_safetensors(path: str | Path, max_bytes: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors by name, the header's __metadata__) from a .safetensors file, every offset checked.

    The same bounds as read_torch_checkpoint: WeightsError for anything malformed or hostile.
    """
    path = Path(path)
    source = str(path)
    budget = _file_budget(path, max_bytes)
    budget.charge(path.stat().st_size, "the file")
    raw = path.read_bytes()
    if len(raw) < 8:
        raise WeightsError(f"{source}: too short for a .safetensors file ({len(raw)} bytes)")
    (header_size,) = struct.unpack("<Q", raw[:8])
    if header_size > min(SAFETENSORS_MAX_HEADER, len(raw) - 8):
        raise WeightsError(
            f"{source}: header length {header_size} exceeds the file ({len(raw)} bytes); truncated or not .safetensors"
        )
    budget.charge(SAFETENSORS_HEADER_OBJECT_BYTES * header_size, "the .safetensors header")
    try:
        header = json.loads(raw[8 : 8 + header_size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WeightsError(f"{source}: the .safetensors header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{source}: the .safetensors header is not a JSON object")
    data = memoryview(raw)[8 + header_size :]
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, (str, int, float, bool)) for v in metadata.values()):
        raise WeightsError(f"{source}: __metadata__ is not a JSON object of strings")
    tensors: dict[str, np.ndarray] = {}
    views = Views(budget)
    for name, info in header.items():
        what = f"{source}: tensor {name[:200]!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WeightsError(f"{what}: malformed header entry ({_describe(info)}; expected dtype, shape, data_offsets)")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            shown = repr(info["dtype"]) if isinstance(info["dtype"], str) and len(info["dtype"]) < 20 else _describe(info["dtype"])
            raise WeightsError(f"{what}: unsupported dtype {shown}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(type(n) is int and 0 <= n < MAX_DIM for n in shape)):
            raise WeightsError(f"{what}: malformed shape ({_describe(shape)}: expected at most {MAX_NDIM} non-negative ints)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise WeightsError(f"{what}: malformed data_offsets ({_describe(offsets)})")
        begin, end = offsets
        itemsize = _numpy_dtype(dtype).itemsize
        nbytes = itemsize * int(np.prod(shape, dtype=object))
        if not 0 <= begin <= end <= len(data):
            raise WeightsError(
                f"{what}: data_offsets [{begin}, {end}] lie outside the {len(data)} data bytes (truncated file?)"
            )
        if end - begin != nbytes:
            raise WeightsError(f"{what}: shape {tuple(shape)} of {dtype} needs {nbytes} bytes, data_offsets give {end - begin}")
        key = (begin, end, dtype, tuple(shape))
        if key not in views.arrays:  # tensors aliasing one byte range share one array
            views.arrays[key] = strided_view(
                data[begin:end], dtype, "<", 0, tuple(shape), _contiguous_strides(shape), what, budget
            )
        tensors[name] = views.arrays[key]
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
