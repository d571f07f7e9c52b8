"""State dicts: validation against an architecture, and the .npz format npresnet loads.

A state dict here is a ``dict[str, np.ndarray]`` under TorchVision's key names
(``conv1.weight``, ``bn1.running_var``, ``layer2.0.downsample.0.weight``,
``fc.bias``, ...), so no renaming table exists anywhere.

PyTorch checkpoints and .safetensors files are read by ``checkpoint.py``
(no torch, no full unpickling); ``extract_state_dict`` finds the state dict in
the layouts people have (bare, nested, prefixed), and ``convert`` writes it out.

The .npz holds those arrays plus one entry, ``__meta__``, a JSON string
(architecture, num_classes, stem, and whatever the converter knew: source
sha256, preprocessing sizes). It is read with ``allow_pickle=False``: loading
weights never runs code.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .manifest import entry_for_sha256
from .specs import ResNetSpec, infer_spec, parameter_shapes

META_KEY = "__meta__"
IGNORED_SUFFIXES = ("num_batches_tracked",)


class WeightsError(ValueError):
    """A weights file or state dict that does not fit; the message names every problem found."""


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
        lines += [f"  missing key: {k} (expected shape {expected[k]})" for k in missing]
        lines += [f"  unexpected key: {k} (shape {tuple(np.shape(state[k]))})" for k in unexpected]
        lines += [f"  shape mismatch: {k}: expected {e}, got {a}" for k, e, a in mismatched]
        raise WeightsError("\n".join(lines))
    return {k: _as_float_array(k, state[k], source) for k in expected}


def infer_spec_from_state(state: Mapping[str, Any], source: str = "state dict") -> ResNetSpec:
    refuse_quantized(state, source)
    try:
        return infer_spec({k: tuple(np.shape(v)) for k, v in _drop_ignored(state).items()})
    except ValueError as exc:
        raise WeightsError(f"{source}: {exc}") from None


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file object) on a temporary file beside `path`, then rename it into place.

    A failure at any point leaves `path` as it was: never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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
    """Write `state` and `meta` (JSON-able) to an .npz, atomically.

    dtype (e.g. "float16": half the bytes): store the convolution and fc weights, nearly all the bytes, in it,
    and say so in meta["stored_dtype"]; batch-norm parameters and statistics and the fc bias stay as they are,
    because a float16 running_var overflows above 65504 and a float16 running_mean (steps of 1/2048 relative)
    shifts the folded bias by mean error x scale; they are a fraction of a percent of the bytes. Loading widens every tensor back to float32 (see _as_float_array), so the model computes in float32.
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
    arrays = {k: np.asarray(v, order="C") for k, v in state.items()}  # C order; 0-d arrays stay 0-d
    arrays[META_KEY] = np.array(json.dumps(dict(meta or {}), sort_keys=True))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an .npz written by save_npz (or any .npz of arrays): (state dict, metadata)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            state = {k: archive[k] for k in archive.files}
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise WeightsError(f"{path}: not a readable .npz file ({exc})") from None
    meta: dict[str, Any] = {}
    if META_KEY in state:
        raw = state.pop(META_KEY)
        try:
            meta = json.loads(str(raw))
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"{path}: {META_KEY} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise WeightsError(f"{path}: {META_KEY} must be a JSON object")
    return state, meta


TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
# Where training scripts nest the model's state dict inside a checkpoint dict.
NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict")
# Wrappers whose prefix a state dict may carry on every key: DataParallel, detection/SSL backbones, Lightning.
KEY_PREFIXES = ("module.", "backbone.", "model.")


def read_weights(source: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict, metadata) from a weights file, by its extension.

    .npz: as save_npz wrote it. .pth/.pt/.bin/.ckpt (PyTorch, read without torch
    or full unpickling) and .safetensors: the state dict found by
    extract_state_dict; metadata names the source file, its sha256 and, for
    an official TorchVision file, the preprocessing it wants.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return load_npz(path)
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        if not path.exists():
            raise WeightsError(f"{path}: no such file")
        raise WeightsError(
            f"{path}: unsupported weights file type {path.suffix!r} "
            f"(expected .npz, .safetensors or a PyTorch checkpoint: {', '.join(TORCH_SUFFIXES)})"
        )
    # Imported here: checkpoint.py raises this module's WeightsError.
    from .checkpoint import read_safetensors, read_torch_checkpoint

    if suffix == SAFETENSORS_SUFFIX:
        contents, _ = read_safetensors(path)
    else:
        contents = read_torch_checkpoint(path)
    state = extract_state_dict(contents, str(path))
    sha256 = file_sha256(path)
    meta: dict[str, Any] = {"source": path.name, "source_sha256": sha256}
    entry = entry_for_sha256(sha256, infer_spec_from_state(state, str(path)).name)
    if entry is not None:
        meta.update(weights=f"{entry.arch}.{entry.name}", **entry.preprocessing)
    return state, meta


def extract_state_dict(contents: Any, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """The ResNet state dict inside a checkpoint's contents, under TorchVision's key names.

    Accepts a bare state dict or one nested under "state_dict", "model" or
    "model_state_dict" (other entries, such as an optimizer or an epoch, are
    ignored); strips "module.", "backbone." or "model." only when every key
    carries it. Raises WeightsError describing what was found otherwise.
    """
    if _is_tensor_dict(contents):
        state = dict(contents)
    elif isinstance(contents, Mapping):
        found = [k for k in NESTED_STATE_KEYS if _is_tensor_dict(contents.get(k))]
        if len(found) > 1:
            raise WeightsError(f"{source}: ambiguous: state dicts under both {found[0]!r} and {found[1]!r}")
        if not found:
            raise WeightsError(
                f"{source}: no state dict found: a dict with entries {_describe_entries(contents)}; expected tensors "
                f"under TorchVision's key names, at the top level or under {' or '.join(map(repr, NESTED_STATE_KEYS))}"
            )
        state = dict(contents[found[0]])
    else:
        raise WeightsError(f"{source}: no state dict found: the file holds a {type(contents).__name__}, not a dict of tensors")
    stripped = True
    while stripped:
        stripped = False
        for prefix in KEY_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    if "conv1.weight" not in state:
        sample = ", ".join(list(state)[:4])
        raise WeightsError(
            f"{source}: not a ResNet state dict: no key conv1.weight among {len(state)} tensors ({sample}, ...); "
            f"a prefix is stripped only when every key carries it ({', '.join(KEY_PREFIXES)})"
        )
    return state


def _is_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items())
    )


def _describe_entries(contents: Mapping) -> str:
    items = [f"{k!r} ({type(v).__name__})" for k, v in list(contents.items())[:8]]
    more = f", ... ({len(contents)} in all)" if len(contents) > 8 else ""
    return "{" + ", ".join(items) + more + "}"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(
    src: str | os.PathLike, dst: str | os.PathLike, meta: Mapping[str, Any] | None = None, dtype=None
) -> dict[str, Any]:
    """Convert a weights file (.pth, .safetensors, .npz) to an .npz npresnet loads without pickle; return its metadata.

    The .npz holds the validated state dict under TorchVision's key names and
    __meta__: arch, num_classes, stem, the source's name and sha256, and for an
    official TorchVision file its weights name, crop_size and resize_size.
    `meta` adds or overrides facts the file cannot tell (e.g. crop_size). The write is atomic.
    dtype="float16" stores the weights in half the bytes (see save_npz).
    """
    if Path(dst).suffix != ".npz":
        raise WeightsError(f"{dst}: the converted file must end in .npz")
    state, found = read_weights(src)
    spec = infer_spec_from_state(state, str(src))
    state = validate_state_dict(state, spec, str(src))
    meta = {**found, **(meta or {}), "arch": spec.name, "num_classes": spec.num_classes, "stem": spec.stem}
    meta.pop("stored_dtype", None)  # the source's own; save_npz records what this file stores
    save_npz(dst, state, meta, dtype)
    if dtype is not None:
        meta["stored_dtype"] = np.dtype(dtype).name
    return meta
