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
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from .weights import WeightsError

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


class CheckpointError(WeightsError):
    """A checkpoint that cannot be read safely: refused global, truncated data, lying tensor metadata."""


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
    data: bytes
    byteorder: str  # "<" or ">"
    source: str  # the file, for messages


def _numpy_dtype(dtype: str, byteorder: str = "<") -> np.dtype:
    base = np.dtype(np.uint16) if dtype == BFLOAT16 else np.dtype(dtype)
    return base.newbyteorder(byteorder) if base.itemsize > 1 else base


def _widen(array: np.ndarray, dtype: str) -> np.ndarray:
    """A native-endian copy; bfloat16 (the top half of a float32) widened exactly to float32."""
    if dtype == BFLOAT16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.dtype(dtype), copy=True)


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


def strided_view(data: bytes, dtype: str, byteorder: str, offset: int, size: tuple, stride: tuple, what: str) -> np.ndarray:
    """Elements [offset + sum(i_k * stride_k)] of `data` as an array of shape `size`, checked to lie inside `data`.

    Raises CheckpointError (naming `what`) for a negative size, stride or
    offset, mismatched ranks, or any element beyond the bytes present.
    """
    if type(offset) is not int or not _is_int_tuple(size) or not _is_int_tuple(stride):
        raise CheckpointError(f"{what}: malformed tensor metadata (offset {offset!r}, size {size!r}, stride {stride!r})")
    if len(size) != len(stride):
        raise CheckpointError(f"{what}: size {size} and stride {stride} have different lengths")
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise CheckpointError(f"{what}: negative offset, size or stride (offset {offset}, size {size}, stride {stride})")
    itemsize = _numpy_dtype(dtype).itemsize
    numel = len(data) // itemsize
    if 0 in size:
        return np.zeros(size, dtype=np.float32 if dtype == BFLOAT16 else np.dtype(dtype))
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= numel:
        raise CheckpointError(
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
    """Stands in for torch._utils._rebuild_tensor / _rebuild_tensor_v2: the view, copied out of its storage.

    The ignored arguments are requires_grad, backward_hooks and metadata, which
    mean nothing for inference.
    """
    if not isinstance(storage, Storage):
        raise CheckpointError(f"malformed checkpoint: a tensor's storage is a {type(storage).__name__}, not a storage record")
    return strided_view(
        storage.data, storage.dtype, storage.byteorder, storage_offset, size, stride,
        f"{storage.source}: storage {storage.key!r}",
    )


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored) -> np.ndarray:
    """Stands in for torch._utils._rebuild_parameter (a state dict saved with keep_vars=True)."""
    if not isinstance(data, np.ndarray):
        raise CheckpointError(f"a parameter's data is {type(data).__name__}, not a tensor")
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
            raise CheckpointError(
                f"{self._source}: refused to unpickle global {module}.{name}: a checkpoint may hold only tensors "
                f"and plain containers (save model.state_dict(), not the model or other objects)"
            ) from None

    def persistent_load(self, pid):
        # zip: ('storage', type, key, location, numel); legacy adds view_metadata (None since torch 1.x).
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CheckpointError(f"{self._source}: unexpected persistent id {pid!r:.200}")
        storage_type, key = pid[1], pid[2]
        if not isinstance(storage_type, StorageType) or not isinstance(key, str):
            raise CheckpointError(f"{self._source}: malformed storage record {pid!r:.200}")
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointError(f"{self._source}: storage views (pre-1.0 legacy format) are not supported")
        if key not in self._storages:
            self._storages[key] = self._load_storage(key, storage_type.dtype)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:
            raise CheckpointError(
                f"{self._source}: storage {key!r} is used as both {storage.dtype} and {storage_type.dtype}"
            )
        return storage


# --- the two .pth formats ---------------------------------------------------------------


def _read_zip_checkpoint(path: Path, source: str):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: not a readable zip archive ({exc}); truncated download?") from None
    archive_size = path.stat().st_size
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
                raise CheckpointError(
                    f"{source}: a TorchScript archive, not a state dict; in torch, save model.state_dict() instead"
                )
            raise CheckpointError(f"{source}: a zip archive but not a PyTorch checkpoint (no <name>/data.pkl)")
        if len(pickles) > 1:
            raise CheckpointError(f"{source}: several checkpoints in one archive: {', '.join(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "<"
        if f"{prefix}byteorder" in names:
            order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise CheckpointError(f"{source}: unknown byteorder {order!r}")
            byteorder = "<" if order == "little" else ">"

        def load_storage(key: str, dtype: str) -> Storage:
            member = f"{prefix}data/{key}"
            try:
                _check_member_size(archive.getinfo(member), archive_size, source)
                data = archive.read(member)
            except KeyError:
                raise CheckpointError(f"{source}: storage {member} is missing from the archive") from None
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
                raise CheckpointError(f"{source}: storage {member} is unreadable ({exc})") from None
            return Storage(key, dtype, data, byteorder, source)

        try:
            _check_member_size(archive.getinfo(pickles[0]), archive_size, source)
            data_pkl = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise CheckpointError(f"{source}: {pickles[0]} is unreadable ({exc})") from None
        return _unpickle_from(io.BytesIO(data_pkl), load_storage, source)


def _check_member_size(info: zipfile.ZipInfo, archive_size: int, source: str) -> None:
    """Refuse a compressed member that would inflate far beyond the file (a zip bomb); torch stores members uncompressed."""
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > 4 * archive_size + (1 << 20):
        raise CheckpointError(
            f"{source}: member {info.filename} claims {info.file_size} bytes from a {archive_size}-byte file"
        )


def _read_legacy_checkpoint(path: Path, source: str):
    raw = path.read_bytes()
    f = io.BytesIO(raw)

    def no_storage(key, dtype):
        raise CheckpointError(f"{source}: unexpected storage reference in the checkpoint header")

    magic = _unpickle_from(f, no_storage, source)
    if magic != LEGACY_MAGIC_NUMBER:
        raise CheckpointError(f"{source}: not a PyTorch checkpoint (neither a zip archive nor the legacy format)")
    version = _unpickle_from(f, no_storage, source)
    if version != LEGACY_PROTOCOL_VERSION:
        raise CheckpointError(f"{source}: unsupported legacy checkpoint protocol {version!r}")
    sys_info = _unpickle_from(f, no_storage, source)
    byteorder = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"

    # The object refers to storages whose bytes come after it: record the references, fill them in afterwards.
    pending: dict[str, Storage] = {}

    def defer_storage(key: str, dtype: str) -> Storage:
        pending[key] = Storage(key, dtype, b"", byteorder, source)
        return pending[key]

    # Tensors need their bytes at rebuild time, so read the object twice: first to learn the keys
    # and find where the storages start, then with the bytes in hand.
    start = f.tell()
    _unpickle_from(f, defer_storage, source, tensors=False)
    keys = _unpickle_from(f, no_storage, source)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(f"{source}: malformed storage key list")
    if sorted(keys) != sorted(pending):
        raise CheckpointError(
            f"{source}: the stored storages {sorted(keys)[:5]} are not the ones the tensors use {sorted(pending)[:5]}"
        )
    storages: dict[str, Storage] = {}
    for key in keys:
        header = f.read(8)
        if len(header) < 8:
            raise CheckpointError(f"{source}: truncated: storage {key!r} is missing")
        (numel,) = struct.unpack("<q" if byteorder == "<" else ">q", header)
        dtype = pending[key].dtype
        nbytes = numel * _numpy_dtype(dtype).itemsize
        if numel < 0 or nbytes > len(raw) - f.tell():
            raise CheckpointError(
                f"{source}: truncated: storage {key!r} claims {numel} {dtype} elements, "
                f"but only {len(raw) - f.tell()} bytes remain"
            )
        storages[key] = Storage(key, dtype, f.read(nbytes), byteorder, source)
    f.seek(start)
    return _unpickle_from(f, lambda key, dtype: storages[key], source)


def _unpickle_from(f: io.BytesIO, load_storage, source: str, tensors: bool = True):
    """One pickle from the stream `f`, leaving `f` just after it."""
    unpickler = RestrictedUnpickler(f, load_storage, source)
    if not tensors:
        # First pass over a legacy object: storages are empty placeholders, so skip the views.
        unpickler.find_class = _find_class_without_views(unpickler)
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, RecursionError, UnicodeDecodeError, OverflowError) as exc:
        raise CheckpointError(f"{source}: corrupt checkpoint pickle ({type(exc).__name__}: {exc})") from None


def _find_class_without_views(unpickler: RestrictedUnpickler):
    checked = unpickler.find_class

    def find_class(module, name):
        found = checked(module, name)
        return Rebuilder(lambda *args: None) if isinstance(found, Rebuilder) else found

    return find_class


def read_torch_checkpoint(path: str | Path) -> Any:
    """The object a .pth file holds, tensors as NumPy arrays (bfloat16 widened to float32).

    Raises CheckpointError for a refused global, a truncated or corrupt file,
    or tensor metadata that does not fit its storage.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        return _read_zip_checkpoint(path, source)
    if head[:1] != b"\x80":
        raise CheckpointError(f"{source}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    return _read_legacy_checkpoint(path, source)


# --- .safetensors -------------------------------------------------------------------------


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors by name, the header's __metadata__) from a .safetensors file, every offset checked."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    raw = path.read_bytes()
    if len(raw) < 8:
        raise CheckpointError(f"{source}: too short for a .safetensors file ({len(raw)} bytes)")
    (header_size,) = struct.unpack("<Q", raw[:8])
    if header_size > min(SAFETENSORS_MAX_HEADER, len(raw) - 8):
        raise CheckpointError(
            f"{source}: header length {header_size} exceeds the file ({len(raw)} bytes); truncated or not .safetensors"
        )
    try:
        header = json.loads(raw[8 : 8 + header_size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{source}: the .safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: the .safetensors header is not a JSON object")
    data = memoryview(raw)[8 + header_size :]
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        what = f"{source}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{what}: malformed header entry {info!r:.200}")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{what}: unsupported dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise CheckpointError(f"{what}: malformed shape {shape!r:.200}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise CheckpointError(f"{what}: malformed data_offsets {offsets!r:.200}")
        begin, end = offsets
        itemsize = _numpy_dtype(dtype).itemsize
        nbytes = itemsize * int(np.prod(shape, dtype=object))
        if not 0 <= begin <= end <= len(data):
            raise CheckpointError(
                f"{what}: data_offsets [{begin}, {end}] lie outside the {len(data)} data bytes (truncated file?)"
            )
        if end - begin != nbytes:
            raise CheckpointError(f"{what}: shape {tuple(shape)} of {dtype} needs {nbytes} bytes, data_offsets give {end - begin}")
        contiguous = _contiguous_strides(shape)
        tensors[name] = strided_view(bytes(data[begin:end]), dtype, "<", 0, tuple(shape), contiguous, what)
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{source}: __metadata__ is not a JSON object")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
