"""Answers from images: top-k ImageNet classes, and pooled embeddings for similarity search.

    import npresnet
    model = npresnet.load("resnet50.npz")
    for top in npresnet.classify(["cat.jpg", "dog.png"], model, topk=3):
        print(top[0].label, top[0].probability)
    vectors = npresnet.embed(["cat.jpg", "dog.png"], model)      # (2, 2048) float32

Images go through the preset the model's weights want (``preprocess.preset_for``).
The 1000 ImageNet class names ship in ``npresnet/data/imagenet_classes.txt``, in
index order; a model with its own head takes its own labels file, one name a line,
or carries its names in its weights' metadata (``meta["classes"]``, as ``npresnet train`` writes).
Embeddings are ``model.features(x)["pool"]``, the globally pooled input to fc; the
.npz written by ``save_embeddings`` holds only plain arrays (no pickle to load it).
"""
from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from .errors import DataError
from .preprocess import ImageClassification, describe, is_pil_image, preprocess, preset_for
from .weights import atomic_write

IMAGENET_CLASSES = "imagenet_classes.txt"


class Prediction(NamedTuple):
    """One of an image's top-k classes; a tuple, so `index, label, probability = prediction` works too."""

    index: int
    label: str
    probability: float


def load_labels(path: str | os.PathLike | None = None) -> list[str]:
    """Class names in index order, one a line: the ImageNet 1000 when `path` is None."""
    if path is None:
        text = resources.files("npresnet.data").joinpath(IMAGENET_CLASSES).read_text(encoding="utf-8")
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise DataError(f"{os.fspath(path)}: no such labels file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{os.fspath(path)}: cannot read labels ({exc})") from None
    labels = text.splitlines()
    while labels and not labels[-1].strip():
        labels.pop()
    return [label.strip() for label in labels]


def labels_for(model: Any, labels: str | os.PathLike | Sequence[str] | None = None) -> list[str]:
    """The names of the model's classes: `labels` (a file or a list), else the names its weights carry
    (meta["classes"], written by npresnet train), else ImageNet's for a 1000-class head, else the class
    indices as strings. Raises ValueError when the count does not match num_classes."""
    num_classes = model.num_classes
    carried = (getattr(model, "meta", None) or {}).get("classes")
    if labels is None and isinstance(carried, list) and len(carried) == num_classes:
        names, source = [str(name) for name in carried], "the weights' class names"
    elif labels is None:
        if num_classes != 1000:
            return [str(i) for i in range(num_classes)]
        names, source = load_labels(), "the ImageNet labels"
    elif isinstance(labels, (str, os.PathLike)):
        names, source = load_labels(labels), os.fspath(labels)
    else:
        names, source = [str(name) for name in labels], "the labels given"
    if len(names) != num_classes:
        raise DataError(f"{source} name {len(names)} classes, but the model's head has num_classes={num_classes}")
    return names


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, in float64; the max is subtracted first so that exp never overflows."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, labels: Sequence[str], k: int = 5) -> list[list[Prediction]]:
    """(N, num_classes) logits -> per row, the k most probable classes, most probable first (ties: lower index)."""
    if k < 1:
        raise ValueError(f"topk must be at least 1, not {k}")
    probabilities = softmax(logits)  # (N, num_classes)
    k = min(k, probabilities.shape[-1])
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]  # (N, k)
    return [[Prediction(int(i), labels[i], float(p[i])) for i in row] for row, p in zip(order, probabilities)]


def _as_list(images: Any) -> list[Any]:
    """One image or many -> a list of images."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray)) or is_pil_image(images):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        return [images]
    return list(images)


def _batches(images: Any, model: Any, preset: ImageClassification | None, batch_size: int) -> Iterable[np.ndarray]:
    """(B, 3, H, W) float32 batches. An (N, 3, H, W) float array is taken as already preprocessed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]
        return
    preset = preset or preset_for(model)
    images = _as_list(images)
    for start in range(0, len(images), batch_size):
        yield preprocess(images[start : start + batch_size], preset)


def classify(
    images: Any,
    model: Any,
    topk: int = 5,
    *,
    labels: str | os.PathLike | Sequence[str] | None = None,
    preset: ImageClassification | None = None,
    batch_size: int = 16,
) -> list[list[Prediction]]:
    """Per image, its top-k (index, label, probability), most probable first.

    images: one image or a list (paths, bytes, PIL images, uint8 (H, W, 3) arrays), or an
    already preprocessed (N, 3, H, W) float array. Raises ImageError on the first bad image.
    """
    names = labels_for(model, labels)
    results: list[list[Prediction]] = []
    for batch in _batches(images, model, preset, batch_size):
        results.extend(top_k(model(batch), names, topk))
    return results


def embed(
    images: Any, model: Any, *, preset: ImageClassification | None = None, batch_size: int = 16
) -> np.ndarray:
    """(N, num_features) pooled features (the input to fc) of the images; 512 or 2048 wide for ImageNet ResNets."""
    pooled = [model.features(batch)["pool"] for batch in _batches(images, model, preset, batch_size)]
    if not pooled:
        return np.zeros((0, model.spec.num_features), dtype=np.float32)
    return np.concatenate(pooled)


def save_embeddings(
    path: str | os.PathLike, names: Sequence[Any], embeddings: np.ndarray, meta: dict[str, Any] | None = None
) -> None:
    """Write embeddings (N, D) with their N image names to an .npz, atomically.

    Entries: "embeddings" (N, D) float, "names" (N,) unicode strings, "meta" a JSON string.
    np.load(path, allow_pickle=False) reads every one of them.
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(names):
        raise ValueError(f"{len(names)} names for embeddings of shape {embeddings.shape}")
    arrays = {
        "embeddings": embeddings,
        "names": np.array([describe(n) if not isinstance(n, str) else n for n in names], dtype=np.str_),
        "meta": np.array(json.dumps(dict(meta or {}), sort_keys=True)),
    }
    if not len(names):
        arrays["names"] = np.zeros(0, dtype="<U1")
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(names, embeddings (N, D), meta) from a file written by save_embeddings."""
    with np.load(path, allow_pickle=False) as archive:
        return [str(n) for n in archive["names"]], archive["embeddings"], json.loads(str(archive["meta"]))
