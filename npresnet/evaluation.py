"""Accuracy on a labelled folder: top-1 and top-k accuracy, mean cross-entropy, per class; and how often two models agree.

    import npresnet
    result = npresnet.evaluate(npresnet.load("resnet50.npz"), "val/", topk=5)
    result.top1, result.topk_accuracy, result.loss          # fractions in [0, 1]; mean cross-entropy
    result = npresnet.evaluate(model_a, "val/", compare=model_b)
    result.agreement                                        # fraction of images with the same top-1

The folder is in TorchVision's ImageFolder layout (``torchvision/datasets/folder.py``):
``DATA/<class>/**/<image>``, one sub-folder per class, class indices in the sorted
order of the folder names (``find_classes``), images found by walking each class
folder (``make_dataset``, sorted, following links) and kept when their extension is
one of TorchVision's ``IMG_EXTENSIONS`` (any case). A class folder without images
keeps its index and is reported (TorchVision's ``allow_empty=True``).

ImageNet-style folders named by WordNet id (``n01440764``, ...) hold the 1000
classes in sorted order only when all 1000 are present; for a subset, or folders
named otherwise, a class map gives each folder its index (``read_class_map``):

* lines ``FOLDER INDEX`` (two fields, the second an integer), or
* folder names in index order, one a line, anything after the first field ignored,
  so that ImageNet's ``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca``) works as it is.

Images go through each model's preprocessing preset (``preprocess.preset_for``); an
image that cannot be read is reported to ``on_error`` and left out of every figure.
The loss is the mean cross-entropy of the logits, ``logsumexp(z) - z[target]``, as
``torch.nn.functional.cross_entropy``, in float64.

The folder listing here is deliberately small; a training dataset may read the same layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .datasets import IMG_EXTENSIONS, class_images, find_classes
from .errors import DataError, ImageError
from .preprocess import ImageClassification, load_image, preset_for



@dataclass(frozen=True)
class ImageFolder:
    """A labelled folder: class folder names, their indices, and (path, class index) per image."""

    root: str
    classes: list[str]  # folder names, sorted
    class_to_idx: dict[str, int]
    samples: list[tuple[str, int]]  # in class-folder order, each folder's files sorted
    empty_classes: list[str] = field(default_factory=list)


def image_folder(root: str | os.PathLike, class_to_idx: Mapping[str, int] | None = None) -> ImageFolder:
    """List an ImageFolder layout: DATA/<class>/**/<image>, classes sorted by name, as TorchVision does.

    class_to_idx maps folder names to class indices (default: their sorted position);
    every class folder must be in it. Raises ValueError naming the problem.
    """
    root = os.fspath(root)
    classes = find_classes(root)  # the class folders, sorted, as training lists them
    if class_to_idx is None:
        class_to_idx = {name: index for index, name in enumerate(classes)}
    else:
        unmapped = [name for name in classes if name not in class_to_idx]
        if unmapped:
            shown = ", ".join(unmapped[:5]) + (f", ... ({len(unmapped)} in all)" if len(unmapped) > 5 else "")
            raise DataError(f"{root}: class folders not in the class map: {shown}")
        class_to_idx = {name: int(class_to_idx[name]) for name in classes}
        negative = [name for name, index in class_to_idx.items() if index < 0]
        if negative:
            raise DataError(f"{root}: negative class index for {', '.join(negative)}")
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for name in classes:
        found = class_images(os.path.join(root, name))
        if not found:
            empty.append(name)
        samples += [(path, class_to_idx[name]) for path in found]
    if not samples:
        raise DataError(
            f"{root}: no image files ({', '.join(IMG_EXTENSIONS)}) in its {len(classes)} class folders"
        )
    return ImageFolder(root, classes, class_to_idx, samples, empty)


def read_class_map(path: str | os.PathLike) -> dict[str, int]:
    """Folder name -> class index from a file: lines "FOLDER INDEX", or folder names in index order (see the module doc)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.split() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except FileNotFoundError:
        raise DataError(f"{os.fspath(path)}: no such class map file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{os.fspath(path)}: cannot read the class map ({exc})") from None
    if not lines:
        raise DataError(f"{os.fspath(path)}: the class map is empty")
    if all(len(fields) == 2 and fields[1].isdigit() for fields in lines):
        pairs = [(fields[0], int(fields[1])) for fields in lines]
    else:
        pairs = [(fields[0], index) for index, fields in enumerate(lines)]
    mapping: dict[str, int] = {}
    for name, index in pairs:
        if name in mapping and mapping[name] != index:
            raise DataError(f"{os.fspath(path)}: folder {name!r} is mapped to both {mapping[name]} and {index}")
        mapping[name] = index
    return mapping


def interleave_classes(samples: Sequence[tuple[str, int]], limit: int | None) -> list[tuple[str, int]]:
    """The first `limit` samples taken in turn from each class (first image of every class, then the second, ...),
    so that a quick run covers every class; all of them, in folder order, when limit is None."""
    if limit is None:
        return list(samples)
    if limit < 1:
        raise DataError(f"limit must be at least 1, not {limit}")
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    queues = list(by_class.values())
    chosen: list[tuple[str, int]] = []
    for depth in range(max(len(q) for q in queues)):
        chosen += [q[depth] for q in queues if depth < len(q)]
        if len(chosen) >= limit:
            break
    return chosen[:limit]


@dataclass(frozen=True)
class ClassAccuracy:
    """One class folder's figures."""

    name: str
    index: int
    count: int
    top1_correct: int
    topk_correct: int

    @property
    def top1(self) -> float | None:
        return self.top1_correct / self.count if self.count else None

    @property
    def topk_accuracy(self) -> float | None:
        return self.topk_correct / self.count if self.count else None


@dataclass
class Evaluation:
    """A model's figures on the readable images of a folder (fractions in [0, 1]; loss in nats)."""

    images: int
    topk: int  # the k of topk_accuracy (at most num_classes)
    top1: float
    topk_accuracy: float
    loss: float  # mean cross-entropy
    per_class: list[ClassAccuracy]
    predictions: np.ndarray  # (images,) top-1 class index per image
    targets: np.ndarray  # (images,) true class index per image
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, problem) of unreadable images
    warnings: list[str] = field(default_factory=list)
    compared: "Evaluation | None" = None  # the second model's figures on the same images
    agreement: float | None = None  # fraction of images where both models' top-1 is the same class


class _Tally:
    """Running sums for one model."""

    def __init__(self, k: int):
        self.k = k
        self.predictions: list[np.ndarray] = []
        self.topk_hits: list[np.ndarray] = []
        self.losses: list[np.ndarray] = []

    def add(self, logits: np.ndarray, targets: np.ndarray) -> None:
        z = logits.astype(np.float64)  # (B, num_classes)
        order = np.argsort(-z, axis=1, kind="stable")[:, : self.k]  # (B, k), ties: lower index first
        self.predictions.append(order[:, 0])
        self.topk_hits.append((order == targets[:, None]).any(axis=1))
        shifted = z - z.max(axis=1, keepdims=True)
        log_sum_exp = np.log(np.exp(shifted).sum(axis=1))
        self.losses.append(log_sum_exp - shifted[np.arange(len(targets)), targets])

    def result(self, folder: ImageFolder, targets: np.ndarray, files: list[str]) -> Evaluation:
        predictions = np.concatenate(self.predictions)
        topk_hits = np.concatenate(self.topk_hits)
        top1_hits = predictions == targets
        per_class = []
        for name in folder.classes:
            index = folder.class_to_idx[name]
            mine = targets == index
            per_class.append(
                ClassAccuracy(name, index, int(mine.sum()), int(top1_hits[mine].sum()), int(topk_hits[mine].sum()))
            )
        return Evaluation(
            images=len(targets),
            topk=self.k,
            top1=float(top1_hits.mean()),
            topk_accuracy=float(topk_hits.mean()),
            loss=float(np.concatenate(self.losses).mean()),
            per_class=per_class,
            predictions=predictions,
            targets=targets,
            files=files,
        )


def evaluate(
    model: Any,
    data: str | os.PathLike | ImageFolder,
    *,
    topk: int = 5,
    limit: int | None = None,
    class_to_idx: Mapping[str, int] | None = None,
    batch_size: int = 16,
    compare: Any = None,
    exif_transpose: bool = False,
    on_error: Callable[[str, str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Evaluation:
    """Top-1 and top-k accuracy and mean cross-entropy of `model` on an ImageFolder layout (see the module doc).

    limit: evaluate this many images, taken in turn from each class. class_to_idx: folder name -> class
    index (read_class_map reads one from a file). compare: a second model run on the same images; the
    result then has .compared (its figures) and .agreement (how often the two top-1 classes are equal).
    on_error(path, problem) hears of each unreadable image, on_progress(count) of each batch done.
    Raises ValueError for a folder with no images, class indices beyond a model's head, or no readable image.
    """
    if topk < 1:
        raise DataError(f"topk must be at least 1, not {topk}")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, not {batch_size}")
    folder = data if isinstance(data, ImageFolder) else image_folder(data, class_to_idx)
    samples = interleave_classes(folder.samples, limit)
    models = [model] if compare is None else [model, compare]
    warnings = [f"{folder.root}: class folder {name!r} holds no images" for name in folder.empty_classes]
    largest = max(folder.class_to_idx.values())
    for m in models:
        if largest >= m.num_classes:
            raise DataError(
                f"{folder.root}: class index {largest} is beyond the model's head (num_classes={m.num_classes}); "
                f"{len(folder.classes)} class folders"
            )
    numbered_by_folder = folder.class_to_idx == {name: i for i, name in enumerate(folder.classes)}
    if numbered_by_folder and len(folder.classes) != model.num_classes:
        warnings.append(
            f"{folder.root}: {len(folder.classes)} class folders for a model with {model.num_classes} classes: "
            f"folder i (sorted by name) is taken as class i; a class map gives other indices"
        )
    presets: list[ImageClassification] = [preset_for(m, exif_transpose=exif_transpose) for m in models]
    tallies = [_Tally(min(topk, m.num_classes)) for m in models]
    targets: list[int] = []
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    distinct = list(dict.fromkeys(presets))  # the two models usually share one preset: preprocess once
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        arrays: list[list[np.ndarray]] = []  # per readable image, its (3, crop, crop) input per distinct preset
        labels: list[int] = []
        for path, index in chunk:
            try:
                image = load_image(path, exif_transpose=exif_transpose)
                arrays.append([_preprocessed(preset, image, path) for preset in distinct])
            except ImageError as exc:
                skipped.append((path, str(exc)))
                if on_error is not None:
                    on_error(path, str(exc))
                continue
            labels.append(index)
            files.append(path)
        if labels:
            batch_targets = np.asarray(labels, dtype=np.int64)
            for m, preset, tally in zip(models, presets, tallies):
                column = distinct.index(preset)
                tally.add(m(np.stack([a[column] for a in arrays])), batch_targets)  # (B, num_classes) logits
            targets += labels
        if on_progress is not None:
            on_progress(len(chunk))
    if not targets:
        raise DataError(f"{folder.root}: none of the {len(samples)} images could be read")
    target_array = np.asarray(targets, dtype=np.int64)
    results = [tally.result(folder, target_array, files) for tally in tallies]
    result = results[0]
    result.skipped, result.warnings = skipped, warnings
    if compare is not None:
        result.compared = results[1]
        result.agreement = float(np.mean(results[0].predictions == results[1].predictions))
    return result


def _preprocessed(preset: ImageClassification, image, path: str) -> np.ndarray:
    """(3, crop, crop) float32 of an already decoded RGB image."""
    try:
        return preset.normalize(preset.resize_and_crop(image))
    except (ValueError, OSError, MemoryError) as exc:
        raise ImageError(f"{path}: {exc}") from None
