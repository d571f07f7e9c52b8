"""State dicts: validation against an architecture, and the .npz format npresnet loads.

A state dict here is a ``dict[str, np.ndarray]`` under TorchVision's key names
(``conv1.weight``, ``bn1.running_var``, ``layer2.0.downsample.0.weight``,
``fc.bias``, ...), so no renaming table exists anywhere.

The .npz holds those arrays plus one entry, ``__meta__``, a JSON string
(architecture, num_classes, stem, and whatever the converter knew: source
sha256, preprocessing sizes). It is read with ``allow_pickle=False``: loading
weights never runs code.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

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


def validate_state_dict(state: Mapping[str, Any], spec: ResNetSpec, source: str = "state dict") -> dict[str, np.ndarray]:
    """Check `state` against `spec`; return it as float arrays, num_batches_tracked dropped.

    Raises WeightsError listing every missing key, every unexpected key and every
    shape mismatch (expected and actual), so that one run shows all problems.
    """
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


def save_npz(path: str | os.PathLike, state: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> None:
    """Write `state` and `meta` (JSON-able) to an .npz, atomically."""
    if META_KEY in state:
        raise WeightsError(f"a state dict key may not be {META_KEY!r}")
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
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


def read_weights(source: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict, metadata) from a weights file, by its extension."""
    path = Path(source)
    if path.suffix == ".npz":
        return load_npz(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    raise WeightsError(f"{path}: unsupported weights file type {path.suffix!r} (expected .npz)")
