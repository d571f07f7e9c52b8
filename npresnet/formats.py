"""Weights files in, a state dict out: dispatch by file type, the layouts checkpoints use, and convert.

``read_weights`` picks the reader by suffix (.npz: ``weights.load_npz``; .pth/.pt/.bin/.ckpt and
.safetensors: ``checkpoint.py``), and by content for any other suffix; every failure is a
``WeightsError`` naming the file. ``extract_state_dict`` finds the ResNet state dict in the
layouts people save (bare, nested under "state_dict"/"model", prefixed by "module." and the
like); ``convert`` writes it out as an .npz.

Reference: the layouts are those of ``torch.save(model.state_dict())``, of training scripts
(TorchVision's ``references/classification/train.py`` saves under "model"), Lightning and DataParallel.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .archive import open_zip
from .checkpoint import read_safetensors, read_torch_checkpoint
from .errors import WeightsError
from .manifest import entry_for_sha256, entry_named
from .weights import IGNORED_SUFFIXES, infer_spec_from_state, load_npz, validate_state_dict
from .writers import check_suffix, write_weights

NPZ_SUFFIX = ".npz"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
# Where training scripts nest the model's state dict inside a checkpoint dict.
NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict")
# Wrappers whose prefix a state dict may carry on every key: DataParallel, detection/SSL backbones, Lightning.
KEY_PREFIXES = ("module.", "backbone.", "model.")


def sniff_format(path: Path) -> str | None:
    """"zip" (a torch checkpoint or an .npz), "torch" (legacy), "safetensors" or None, from a file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:1] == b"\x80":
        return "torch"  # a legacy checkpoint: a pickle
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 27:
        return "safetensors"
    return None


def read_weights(source: str | os.PathLike, max_bytes: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict, metadata) from a weights file.

    .npz: as save_npz wrote it. .pth/.pt/.bin/.ckpt (PyTorch, read without torch
    or full unpickling) and .safetensors: the state dict found by
    extract_state_dict; metadata names the source file, its sha256 and, for
    an official TorchVision file, the preprocessing it wants. Any other suffix: by content.
    max_bytes caps what the load may allocate (default 4 x the file size + 64 MiB; see archive.py).
    """
    path = Path(source)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    suffix = path.suffix.lower()
    kind = {NPZ_SUFFIX: "npz", SAFETENSORS_SUFFIX: "safetensors", **dict.fromkeys(TORCH_SUFFIXES, "torch")}.get(suffix)
    if kind is None:
        kind = sniff_format(path)
        if kind == "zip":  # a torch zip checkpoint or an .npz: the members tell
            with open_zip(path, str(path)) as archive:
                kind = "npz" if all(n.endswith(".npy") for n in archive.namelist()) else "torch"
        if kind is None:
            raise WeightsError(
                f"{path}: not a valid weights file: unsupported type {path.suffix!r} and not recognised by its content "
                f"(expected .npz, .safetensors or a PyTorch checkpoint: {', '.join(TORCH_SUFFIXES)})"
            )
    if kind == "npz":
        return load_npz(path, max_bytes)
    if kind == "safetensors":
        contents, _ = read_safetensors(path, max_bytes)
    else:
        contents = read_torch_checkpoint(path, max_bytes)
    state = extract_state_dict(contents, str(path))
    sha256 = file_sha256(path)
    meta: dict[str, Any] = {"source": path.name, "source_sha256": sha256}
    entry = entry_for_sha256(sha256, infer_spec_from_state(state, str(path)).name)
    named = entry_named(path.name)
    if named is not None and entry != named:  # else it would silently lose the preprocessing its name promises
        raise WeightsError(
            f"{path}: named like TorchVision's {named.arch} {named.name} file, but its sha256 is {sha256}, not "
            f"{named.sha256_prefix}...: a corrupt or incomplete download (download it again), or another file (rename it)"
        )
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
        sample = ", ".join(k[:100] for k in list(state)[:4])
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
    items = [f"{str(k)[:100]!r} ({type(v).__name__})" for k, v in list(contents.items())[:8]]
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
    """Convert a weights file (.pth, .safetensors, .npz) to .npz, .pth/.pt or .safetensors (by dst's suffix); return its metadata.

    The .npz holds the validated state dict under TorchVision's key names and
    __meta__: arch, num_classes, stem, the source's name and sha256, and for an
    official TorchVision file its weights name, crop_size and resize_size.
    `meta` adds or overrides facts the file cannot tell (e.g. crop_size). The write is atomic.
    dtype="float16" stores the weights of an .npz in half the bytes (see save_npz).
    .pth and .safetensors are for torch (``writers.py``): TorchVision's state dict,
    num_batches_tracked included (the source's, else 0); .safetensors keeps the metadata too.
    """
    if check_suffix(dst) != NPZ_SUFFIX and dtype is not None:
        raise WeightsError(f"{dst}: a stored dtype (--dtype) is only for .npz files")
    state, found = read_weights(src)
    spec = infer_spec_from_state(state, str(src))
    num_batches_tracked = {k: v for k, v in state.items() if k.endswith(IGNORED_SUFFIXES)}
    state = validate_state_dict(state, spec, str(src))
    meta = {**found, **(meta or {}), "arch": spec.name, "num_classes": spec.num_classes, "stem": spec.stem}
    meta.pop("stored_dtype", None)  # the source's own; save_npz records what this file stores
    write_weights(dst, state, spec, meta, num_batches_tracked, dtype=dtype)
    if dtype is not None:
        meta["stored_dtype"] = np.dtype(dtype).name
    return meta
