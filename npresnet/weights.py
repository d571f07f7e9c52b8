"""State dicts: validation against an architecture, and the .npz format npresnet loads.

A state dict here is a ``dict[str, np.ndarray]`` under TorchVision's key names
(``conv1.weight``, ``bn1.running_var``, ``layer2.0.downsample.0.weight``,
``fc.bias``, ...), so no renaming table exists anywhere.

PyTorch checkpoints and .safetensors files are read by ``checkpoint.py``; ``formats.py``
dispatches on the file type, finds the state dict in a checkpoint and converts.

The .npz holds those arrays plus one entry, ``__meta__``, a JSON string
(architecture, num_classes, stem, and whatever the converter knew: source
sha256, preprocessing sizes), checked against ``META_SCHEMA`` when written and when read,
so that nothing malformed reaches preprocessing. ``load_npz`` reads it without numpy's
loader: each member is read by its real inflated size against the file's budget
(``archive.py``), and each .npy header is parsed and checked (dtype, shape, size against
the member's bytes) before any array exists. No pickle: loading weights never runs code.

References: NumPy ``numpy/lib/format.py`` (the .npy format, versions 1.0 to 3.0);
``np.savez`` (an .npz is a zip of ``<name>.npy`` members).
"""
from __future__ import annotations

import ast
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .archive import LoadBudget, open_zip, read_member
from .errors import WeightsError
from .files import new_file_mode
from .specs import ARCHITECTURES, CIFAR_STEM, IMAGENET_STEM, ResNetSpec, infer_spec, parameter_shapes

META_KEY = "__meta__"
IGNORED_SUFFIXES = ("num_batches_tracked",)
NPY_MAGIC = b"\x93NUMPY"
NPY_MAX_HEADER = 10_000  # NumPy's own limit (format._MAX_HEADER_SIZE)
NPY_DESCR = re.compile(r"[<>|=](b1|[iu][1248]|f[248]|U[0-9]{1,7})")  # numbers, and the unicode of __meta__
NPY_MAX_NDIM = 32
MAX_META_BYTES = 1 << 20


def _drop_ignored(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}


def _as_float_array(key: str, value: Any, source: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype not in (np.float32, np.float64):
        if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
            array = array.astype(np.float32)
        else:
            raise WeightsError(f"{source}: {key} has dtype {array.dtype}, expected floating point")
    return array


def refuse_quantized(state: Mapping[str, Any], source: str) -> None:
    """A clear error for an int8 file (npresnet quantize) where float weights are needed."""
    if any(k.endswith(".weight_quantized") for k in state):
        raise WeightsError(
            f"{source} is an int8 quantized model (npresnet quantize): only npresnet.load() on the numpy "
            f"backend runs it; this needs float weights (the .npz, .pth or .safetensors it was quantized from)"
        )


def validate_state_dict(state: Mapping[str, Any], spec: ResNetSpec, source: str = "state dict") -> dict[str, np.ndarray]:
    """Check `state` against `spec`; return it as float arrays, num_batches_tracked dropped.

    Raises WeightsError listing every missing key, every unexpected key and every
    shape mismatch (expected and actual), so that one run shows all problems.
    """
    refuse_quantized(state, source)
    state = _drop_ignored(state)
    expected = parameter_shapes(spec)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, expected[k], tuple(np.shape(state[k])))
        for k in expected
        if k in state and tuple(np.shape(state[k])) != expected[k]
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit {spec.name} (num_classes={spec.num_classes}, stem={spec.stem}):"]
        lines += _at_most([f"  missing key: {k} (expected shape {expected[k]})" for k in missing])
        lines += _at_most([f"  unexpected key: {k[:200]} (shape {tuple(np.shape(state[k]))})" for k in unexpected[:MAX_LISTED + 1]],
                          len(unexpected))
        lines += _at_most([f"  shape mismatch: {k}: expected {e}, got {a}" for k, e, a in mismatched])
        raise WeightsError("\n".join(lines))
    return {k: _as_float_array(k, state[k], source) for k in expected}


MAX_LISTED = 50  # problems listed per kind: a hostile file may hold a million unexpected keys


def _at_most(lines: list[str], total: int | None = None) -> list[str]:
    total = len(lines) if total is None else total
    if total <= MAX_LISTED:
        return lines
    return lines[:MAX_LISTED] + [f"  ... and {total - MAX_LISTED} more like these"]


def infer_spec_from_state(state: Mapping[str, Any], source: str = "state dict") -> ResNetSpec:
    refuse_quantized(state, source)
    try:
        return infer_spec({k: tuple(np.shape(v)) for k, v in _drop_ignored(state).items()})
    except ValueError as exc:
        raise WeightsError(f"{source}: {exc}") from None


# --- metadata ----------------------------------------------------------------------------------


def _positive_int(limit: int):
    return lambda v: type(v) is int and 0 < v <= limit, f"a positive integer up to {limit}"


def _one_of(choices):
    return lambda v: v in choices, "one of " + ", ".join(map(repr, choices))


def _string(limit: int = 4096):
    return lambda v: isinstance(v, str) and len(v) <= limit, f"a string of up to {limit} characters"


# What npresnet writes (model.save, convert, fetch, and the fine-tuning and quantising tools), and
# what preprocessing and the CLI read back. Each: (check, what it must be).
META_SCHEMA: dict[str, tuple[Any, str]] = {
    "arch": _one_of((*ARCHITECTURES, "custom")),
    "num_classes": _positive_int(1 << 20),
    "stem": _one_of((IMAGENET_STEM, CIFAR_STEM)),
    "crop_size": _positive_int(4096),
    "resize_size": _positive_int(4096),
    "source": _string(),
    "source_sha256": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None, "64 hex digits"),
    "weights": _string(),
    "classes": (
        lambda v: isinstance(v, list) and len(v) <= 1 << 20 and all(isinstance(c, str) and len(c) <= 1024 for c in v),
        "a list of class names (strings)",
    ),
    "dtype": _string(64),
    "stored_dtype": _string(64),
    "quantized": (lambda v: type(v) is bool, "true or false"),
}
MAX_META_ITEMS = 1 << 20


def _plain(value: Any, depth: int = 0) -> bool:
    """Any other key: JSON scalars, and lists or objects of them, at most two levels deep."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return len(value) <= 1 << 16
    if depth >= 2:
        return False
    if isinstance(value, list):
        return len(value) <= MAX_META_ITEMS and all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return len(value) <= 1024 and all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def validate_meta(meta: Any, source: str) -> dict[str, Any]:
    """Check weights metadata against META_SCHEMA (unknown keys: plain JSON values); WeightsError naming every bad key."""
    if not isinstance(meta, dict):
        raise WeightsError(f"{source}: {META_KEY} must be a JSON object, not a {type(meta).__name__}")
    problems = []
    for key, value in meta.items():
        if key in META_SCHEMA:
            check, wanted = META_SCHEMA[key]
            if not check(value):
                problems.append(f"{key} must be {wanted}, not a {type(value).__name__}")
        elif not isinstance(key, str) or not _plain(value):
            problems.append(f"{str(key)[:100]}: a value of type {type(value).__name__} too large or too deeply nested")
    if problems:
        raise WeightsError(f"{source}: malformed {META_KEY}: " + "; ".join(problems))
    return meta


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file object) on a temporary file beside `path`, then rename it into place.

    A failure at any point leaves `path` as it was: never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp's 0600 is for scratch files, not for what the user asked for
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_npz(
    path: str | os.PathLike, state: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None, dtype=None
) -> None:
    """Write `state` and `meta` (JSON-able, checked against META_SCHEMA) to an .npz, atomically.

    dtype (e.g. "float16": half the bytes): store the convolution and fc weights, nearly all the bytes, in it,
    and say so in meta["stored_dtype"]; batch-norm parameters and statistics and the fc bias stay as they are,
    because a float16 running_var overflows above 65504 and a float16 running_mean (steps of 1/2048 relative)
    shifts the folded bias by mean error x scale; they are a fraction of a percent of the bytes. Loading widens
    every tensor back to float32 (see _as_float_array), so the model computes in float32.
    """
    if META_KEY in state:
        raise WeightsError(f"a state dict key may not be {META_KEY!r}")
    meta = {k: v for k, v in (meta or {}).items() if k != "stored_dtype"}
    if dtype is not None:
        dtype = np.dtype(dtype)
        with np.errstate(over="ignore"):  # reported below, naming the tensors
            state = {k: v.astype(dtype) if np.ndim(v) > 1 else v for k, v in state.items()}
        overflowed = [k for k, v in state.items() if not np.all(np.isfinite(v))]
        if overflowed:
            raise WeightsError(f"{', '.join(overflowed)}: values out of {dtype.name}'s range (or not finite)")
        meta["stored_dtype"] = dtype.name
    validate_meta(meta, f"{os.fspath(path)} (not written)")
    arrays = {k: np.asarray(v, order="C") for k, v in state.items()}  # C order; 0-d arrays stay 0-d
    arrays[META_KEY] = np.array(json.dumps(dict(meta or {}), sort_keys=True))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(
    path: str | os.PathLike, max_bytes: int | None = None, weights_meta: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an .npz written by save_npz (or any .npz of numeric arrays): (state dict, metadata).

    Raises WeightsError naming the file for anything that is not a zip of well-formed .npy
    members, for a load that would allocate more than `max_bytes` (default: 4 x the file size
    + 64 MiB, or $NPRESNET_MAX_LOAD_BYTES), and for metadata outside META_SCHEMA.
    weights_meta=False skips META_SCHEMA, for files whose metadata is not a weights file's
    (a training checkpoint checks its own).
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if head[:2] != b"PK":
        what = "an .npy array, not an .npz archive" if head == NPY_MAGIC else "not a zip archive"
        raise WeightsError(f"{source}: not a valid weights file: {what} (an .npz is a zip of .npy arrays)")
    budget = LoadBudget(source, path.stat().st_size, max_bytes)
    state: dict[str, np.ndarray] = {}
    with open_zip(path, source) as archive:
        for info in archive.infolist():
            name = info.filename
            if not name.endswith(".npy") or name[:-4] in state:
                raise WeightsError(f"{source}: member {name[:200]!r} is not an .npy array (or appears twice)")
            state[name[:-4]] = parse_npy(read_member(archive, info, budget, source), f"{source}: member {name[:200]!r}")
    meta: dict[str, Any] = {}
    if META_KEY in state:
        raw = state.pop(META_KEY)
        if raw.dtype.kind != "U" or raw.shape != () or raw.dtype.itemsize > 4 * MAX_META_BYTES:
            raise WeightsError(f"{source}: {META_KEY} must be one JSON string of at most {MAX_META_BYTES} characters")
        try:
            meta = json.loads(str(raw))
        except (ValueError, RecursionError) as exc:
            raise WeightsError(f"{source}: {META_KEY} is not valid JSON ({type(exc).__name__})") from None
        if weights_meta:
            validate_meta(meta, source)
    return state, meta


def parse_npy(data: bytes | bytearray, what: str) -> np.ndarray:
    """The array in one .npy member's bytes, its header checked before the array is made."""
    if data[:6] != NPY_MAGIC or len(data) < 10 or data[6] not in (1, 2, 3) or data[7] != 0:
        raise WeightsError(f"{what}: not an .npy array (bad magic or version)")
    if data[6] == 1:
        header_len, start = int.from_bytes(data[8:10], "little"), 10
    else:
        header_len, start = int.from_bytes(data[8:12], "little"), 12
    if header_len > min(NPY_MAX_HEADER, len(data) - start):
        raise WeightsError(f"{what}: .npy header of {header_len} bytes is too long or truncated")
    try:
        text = bytes(data[start : start + header_len]).decode("utf-8" if data[6] == 3 else "latin1")
        header = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeDecodeError):
        raise WeightsError(f"{what}: the .npy header is not a Python literal") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise WeightsError(f"{what}: the .npy header must hold exactly descr, fortran_order and shape")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str) or not NPY_DESCR.fullmatch(descr):
        raise WeightsError(f"{what}: dtype {str(descr)[:40]!r} is not a plain number or string type (no objects)")
    if not (isinstance(shape, tuple) and len(shape) <= NPY_MAX_NDIM and all(type(n) is int and n >= 0 for n in shape)):
        raise WeightsError(f"{what}: malformed shape in the .npy header")
    if type(fortran) is not bool:
        raise WeightsError(f"{what}: fortran_order must be true or false")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError):
        raise WeightsError(f"{what}: dtype {descr!r} is not understood") from None
    count = 1
    for n in shape:
        count *= n
    offset = start + header_len
    nbytes = count * dtype.itemsize
    if dtype.itemsize == 0 or nbytes != len(data) - offset:
        needs = "more than 2**64" if nbytes > 2**64 else str(nbytes)
        raise WeightsError(f"{what}: a {len(shape)}-d shape of {descr} needs {needs} bytes, the member holds {len(data) - offset}")
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if not flat.flags.writeable:  # a stored member comes back as bytes: copy, so that arrays are writable as np.load's are
        flat = flat.copy()
    return flat.reshape(shape, order="F" if fortran else "C")


def __getattr__(name: str):
    # Dispatch by file type and convert moved to formats.py (which imports this module); the old
    # imports (`from npresnet.weights import convert, read_weights`) still work, resolved lazily.
    if name in ("read_weights", "convert", "extract_state_dict", "file_sha256", "TORCH_SUFFIXES", "SAFETENSORS_SUFFIX"):
        from . import formats

        return getattr(formats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
