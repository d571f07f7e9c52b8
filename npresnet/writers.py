"""Writing PyTorch checkpoints (.pth) and .safetensors files without torch; the readers are in ``checkpoint.py``.

A file written here loads straight into TorchVision's model::

    model.load_state_dict(torch.load("resnet18.pth", weights_only=True), strict=True)
    model.load_state_dict(safetensors.torch.load_file("resnet18.safetensors"), strict=True)

``.pth`` is torch's zip serialization (``torch.save`` since 1.6), as torch 2.13
writes it: a zip archive whose members are stored uncompressed, each one's data
starting at a multiple of 64 bytes (the local header's extra field is padding,
as in torch's miniz writer), holding

* ``archive/data.pkl``: a protocol-2 pickle of an ``OrderedDict`` mapping each
  key to ``torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())``,
  where ``storage`` is the persistent id ``('storage', torch.FloatStorage, '<k>', 'cpu', numel)``;
* ``archive/data/<k>``: that storage's raw little-endian bytes;
* ``archive/byteorder`` (``little``) and ``archive/version`` (``3``).

torch's own ``.format_version`` record is left out on purpose: it tells
``torch.load`` that every member is followed by a miniz data descriptor, so that
storage offsets can be computed instead of read; Python's zipfile writes none.

The pickle is written opcode by opcode (``pickle_state_dict``) rather than by
``pickle.Pickler``, which would import ``torch`` to check the globals it names.
It uses only the opcodes torch's ``weights_only`` unpickler accepts.

``.safetensors``: an 8-byte little-endian header length, a JSON header
(``name -> {dtype, shape, data_offsets}`` and ``__metadata__``, whose values must
be strings) padded with spaces to a multiple of 8, then the tensors' bytes, packed
without gaps, widest dtype first, so that each tensor is aligned to its element size.

References: PyTorch ``torch/serialization.py`` (``_save``, ``_load``) and
``torch/_weights_only_unpickler.py``; ``pickletools`` (the opcodes); PKWARE's
APPNOTE.TXT (the zip format); the safetensors format
(https://github.com/huggingface/safetensors, README "Format").
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .specs import ResNetSpec, parameter_shapes
from .errors import WeightsError
from .weights import IGNORED_SUFFIXES, atomic_write, save_npz

ARCHIVE_NAME = "archive"  # the folder torch.save uses inside the zip for a file object
STORAGE_ALIGNMENT = 64  # torch.utils.serialization.config.save.storage_alignment's default
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # a fixed time stamp: the same state dict gives the same bytes
PADDING_HEADER_ID = b"FB"  # the extra-field id torch's writer pads with
MAX_TENSOR_BYTES = 1 << 30  # under zipfile's zip64 threshold, where its local header (and so the alignment) changes

# Element dtype -> torch storage class (the inverse of checkpoint.STORAGE_DTYPES) and safetensors dtype.
TORCH_STORAGES = {
    "float64": "DoubleStorage",
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
}
SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}

NPZ_SUFFIX = ".npz"
TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
WRITABLE_SUFFIXES = (NPZ_SUFFIX, *TORCH_SUFFIXES, SAFETENSORS_SUFFIX)


def _little_endian(key: str, value: Any) -> np.ndarray:
    """A C-contiguous little-endian copy of `value`, or WeightsError naming `key` for a dtype torch cannot hold."""
    if not isinstance(key, str):
        raise WeightsError(f"state dict keys must be strings, not {type(key).__name__} ({key!r:.80})")
    array = np.asarray(value)
    if array.dtype.name not in TORCH_STORAGES:
        raise WeightsError(f"{key}: cannot write dtype {array.dtype} (supported: {', '.join(TORCH_STORAGES)})")
    array = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")  # ascontiguousarray would make () into (1,)
    if array.nbytes > MAX_TENSOR_BYTES:
        raise WeightsError(f"{key}: {array.nbytes} bytes is more than one tensor may hold here ({MAX_TENSOR_BYTES})")
    return array


# --- the pickle, opcode by opcode -----------------------------------------------------------

PROTO_2 = b"\x80\x02"
MARK, STOP, TUPLE, EMPTY_TUPLE, REDUCE, BINPERSID, NEWFALSE, SETITEMS = b"(", b".", b"t", b")", b"R", b"Q", b"\x89", b"u"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode("ascii") + b"\n" + name.encode("ascii") + b"\n"


def _str(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(value: int) -> bytes:
    if 0 <= value < 1 << 31:
        return b"J" + struct.pack("<i", value)  # BININT
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _tuple(items: list[bytes]) -> bytes:
    return MARK + b"".join(items) + TUPLE


def _empty_ordered_dict() -> bytes:
    return _global("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE


def pickle_state_dict(entries: list[tuple[str, str, str, tuple[int, ...]]]) -> bytes:
    """data.pkl for (key, storage key, storage class, shape) entries, each tensor the whole of its storage.

    Unpickled by torch, it is an OrderedDict of tensors; the storages' bytes live
    beside it in the archive (data/<storage key>), reached through BINPERSID.
    """
    out = [PROTO_2, _empty_ordered_dict(), MARK]
    for key, storage_key, storage_class, shape in entries:
        numel = int(np.prod(shape, dtype=np.int64))
        stride = [int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape))]  # C order
        storage = _tuple([_str("storage"), _global("torch", storage_class), _str(storage_key), _str("cpu"), _int(numel)])
        args = [
            storage + BINPERSID,
            _int(0),  # storage_offset
            _tuple([_int(n) for n in shape]),  # size
            _tuple([_int(s) for s in stride]),  # stride
            NEWFALSE,  # requires_grad
            _empty_ordered_dict(),  # backward_hooks
        ]
        out += [_str(key), _global("torch._utils", "_rebuild_tensor_v2"), _tuple(args), REDUCE]
    out += [SETITEMS, STOP]
    return b"".join(out)


# --- .pth -----------------------------------------------------------------------------------


def _write_aligned(archive: zipfile.ZipFile, f, name: str, data: bytes) -> None:
    """One stored member whose data starts at a multiple of STORAGE_ALIGNMENT, padded by an extra field."""
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    header = 30 + len(name.encode("utf-8")) + 4  # fixed local header, the name, the extra field's id and length
    pad = -(f.tell() + header) % STORAGE_ALIGNMENT
    info.extra = PADDING_HEADER_ID + struct.pack("<H", pad) + b"Z" * pad
    archive.writestr(info, data)
    if (f.tell() - len(data)) % STORAGE_ALIGNMENT:
        raise RuntimeError(f"{name}: zipfile wrote a local header of unexpected length, so the data is not aligned")


def save_pth(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write `state` (name -> array) as torch.save would write the same tensors, atomically.

    ``torch.load(path, weights_only=True)`` returns an OrderedDict of tensors in
    the same order, with the same dtypes (float64, float32, float16, int64, ...).
    """
    arrays = {key: _little_endian(key, value) for key, value in state.items()}
    entries = [(key, str(i), TORCH_STORAGES[a.dtype.name], a.shape) for i, (key, a) in enumerate(arrays.items())]
    data_pkl = pickle_state_dict(entries)

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
            _write_aligned(archive, f, f"{ARCHIVE_NAME}/data.pkl", data_pkl)
            _write_aligned(archive, f, f"{ARCHIVE_NAME}/byteorder", b"little")
            for (_, storage_key, _, _), array in zip(entries, arrays.values()):
                _write_aligned(archive, f, f"{ARCHIVE_NAME}/data/{storage_key}", array.tobytes())
            _write_aligned(archive, f, f"{ARCHIVE_NAME}/version", b"3\n")

    atomic_write(path, write)


# --- .safetensors ---------------------------------------------------------------------------


def safetensors_metadata(meta: Mapping[str, Any] | None) -> dict[str, str]:
    """npresnet's metadata as safetensors wants it: string values (others as JSON: 10 -> "10")."""
    return {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (meta or {}).items()}


def save_safetensors(path: str | os.PathLike, state: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> None:
    """Write `state` (name -> array) and `meta` (as __metadata__ strings) to a .safetensors file, atomically."""
    arrays = {key: _little_endian(key, value) for key, value in state.items()}
    if "__metadata__" in arrays:
        raise WeightsError("a tensor may not be named '__metadata__' in a .safetensors file")
    # Widest elements first: with no gaps allowed between tensors, this keeps each one aligned to its itemsize.
    order = sorted(arrays, key=lambda k: -arrays[k].dtype.itemsize)
    header: dict[str, Any] = {}
    metadata = safetensors_metadata(meta)
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for key in order:
        a = arrays[key]
        header[key] = {"dtype": SAFETENSORS_DTYPES[a.dtype.name], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    def write(f) -> None:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for key in order:
            f.write(arrays[key].tobytes())

    atomic_write(path, write)


# --- what convert writes ----------------------------------------------------------------------


def check_suffix(path: str | os.PathLike) -> str:
    """The lower-case suffix of a file convert can write, or WeightsError naming the one it cannot."""
    suffix = Path(path).suffix.lower()
    if suffix not in WRITABLE_SUFFIXES:
        what = f"a {Path(path).suffix!r} file" if suffix else "a file without a suffix"
        raise WeightsError(f"{os.fspath(path)}: cannot write {what}; the converted file must end in {', '.join(WRITABLE_SUFFIXES)}")
    return suffix


def torchvision_state_dict(
    state: Mapping[str, np.ndarray], spec: ResNetSpec, num_batches_tracked: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """`state` in TorchVision's key order, each batch norm's ``num_batches_tracked`` (int64 scalar) after its running_var.

    torch's strict load_state_dict wants those counters; their values come from
    `num_batches_tracked` (keys as in the state dict) where given, else 0.
    """
    tracked = num_batches_tracked or {}
    out: dict[str, np.ndarray] = {}
    for key in parameter_shapes(spec):
        out[key] = state[key]
        if key.endswith(".running_var"):
            counter = key[: -len("running_var")] + IGNORED_SUFFIXES[0]
            out[counter] = np.asarray(tracked.get(counter, 0), dtype=np.int64).reshape(())
    return out


def write_weights(
    path: str | os.PathLike,
    state: Mapping[str, np.ndarray],
    spec: ResNetSpec,
    meta: Mapping[str, Any],
    num_batches_tracked: Mapping[str, Any] | None = None,
    dtype=None,
) -> None:
    """Write a validated state dict as .npz (with meta; stored in `dtype` if given), .pth/.pt (what torch.load
    reads) or .safetensors (with meta)."""
    suffix = check_suffix(path)
    if suffix == NPZ_SUFFIX:
        save_npz(path, torchvision_state_dict(state, spec, num_batches_tracked), meta, dtype)
    elif suffix == SAFETENSORS_SUFFIX:
        save_safetensors(path, torchvision_state_dict(state, spec, num_batches_tracked), meta)
    else:
        save_pth(path, torchvision_state_dict(state, spec, num_batches_tracked))
