"""Training data: an ImageFolder tree, TorchVision's training transforms, and batches prefetched by threads.

Layout (TorchVision's ``datasets.ImageFolder``): ``DATA/train/<class>/**/*.jpg`` and
``DATA/val/<class>/**/*.jpg``. Classes are the sub-folder names sorted by name and
numbered in that order; files are those with one of ``IMG_EXTENSIONS`` (TorchVision's
list), found by walking each class folder, sorted. Validation uses the training
folder's class numbers, so a class of val/ missing from train/ is an error.

Transforms, as defined in ``torchvision/transforms/transforms.py`` (``get_params``
step for step), drawing from a NumPy ``Generator`` instead of torch's:

* ``RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3/4, 4/3))``: up to 10 tries
  of an area fraction uniform in ``scale`` and an aspect ratio log-uniform in
  ``ratio``; the first box that fits is cropped and resized to size x size with
  PIL's bilinear filter; if none fits, the central crop at the nearest allowed
  ratio (the whole image when its own ratio is allowed).
* ``RandomCrop(size, padding=4)``: zero padding on every side, then a crop at a
  uniform offset (the CIFAR recipe, for ``stem="cifar"``).
* ``RandomHorizontalFlip(p=0.5)``, then ``ToTensor`` and ``Normalize`` (ImageNet
  mean and std, in float32 as torch: ``preprocess.ImageClassification.normalize``).

Randomness is reproducible and independent of thread scheduling: epoch e's order
comes from the seed sequence ``(seed, e, 0, 0)`` and sample i's augmentation in
epoch e from ``(seed, e, 1, i)``, so every sample has its own stream whichever
thread prepares it, and a run resumed at step k sees the batches it would have.

Decoding and augmentation run in a thread pool a few batches ahead of the
training step (Pillow releases the GIL while decoding and resizing); the number
of batches in flight is bounded. A bad image is left out of its batch and
reported once, never fatal.
"""
from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from .preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageClassification,
    ImageError,
    describe,
    load_image,
    pil,
)
from .errors import DataError
from .specs import CIFAR_STEM, IMAGENET_STEM

if TYPE_CHECKING:
    from PIL import Image

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SHUFFLE_STREAM, SAMPLE_STREAM = 0, 1


# --- the folder tree ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFolder:
    """The images of one split: (path, class index) pairs, classes numbered in sorted order."""

    root: str
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]

    def __len__(self) -> int:
        return len(self.samples)

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for _, label in self.samples:
            counts[label] += 1
        return counts


def find_classes(root: str | os.PathLike) -> list[str]:
    """The class folder names under `root`, sorted (torchvision.datasets.folder.find_classes)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise DataError(f"{root}: no class folders in it (expected {root}/<class>/<image files>)")
    return classes


def class_images(folder: str | os.PathLike) -> list[str]:
    """The image files under one class folder, searched recursively, in sorted order (as TorchVision lists them)."""
    return [
        os.path.join(dirpath, fname)
        for dirpath, _, fnames in sorted(os.walk(folder, followlinks=True))
        for fname in sorted(fnames)
        if fname.lower().endswith(IMG_EXTENSIONS)
    ]


def image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> ImageFolder:
    """The ImageFolder at `root`, numbering its classes by `classes` (default: its own, sorted).

    Raises DataError for a missing root, one without class folders, a class folder
    without image files, or (when `classes` is given) a class folder not in `classes`.
    """
    root = os.fspath(root)
    found = find_classes(root)
    if classes is None:
        classes = found
    else:
        unknown = [name for name in found if name not in classes]
        if unknown:
            raise DataError(
                f"{root}: class folders not among the training classes: {', '.join(unknown)} "
                f"(training classes: {', '.join(classes)})"
            )
    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for name in found:
        paths = class_images(os.path.join(root, name))
        if not paths:
            empty.append(name)
        samples.extend((path, class_to_idx[name]) for path in paths)
    if empty:
        raise DataError(
            f"{root}: no image files in class folder(s) {', '.join(empty)} "
            f"(image files end in {', '.join(IMG_EXTENSIONS)})"
        )
    return ImageFolder(root, tuple(classes), tuple(samples))


def train_val_folders(data: str | os.PathLike) -> tuple[ImageFolder, ImageFolder]:
    """DATA/train and DATA/val, val numbered by train's classes."""
    data = os.fspath(data)
    if not os.path.isdir(data):
        raise DataError(f"{data}: no such folder")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data, split)):
            raise DataError(
                f"{data}: no {split}/ folder in it (expected {data}/train/<class>/*.jpg and {data}/val/<class>/*.jpg)"
            )
    train = image_folder(os.path.join(data, "train"))
    val = image_folder(os.path.join(data, "val"), train.classes)
    return train, val


# --- transforms --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomResizedCrop:
    """A random box of random area and aspect ratio, resized to size x size (TorchVision's definition)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bilinear"

    def get_params(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, box height, box width) for an image of width x height."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        # No try fitted: the central crop, at the nearest ratio allowed.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w = width
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h = height
            w = int(round(h * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: "Image.Image", rng: np.random.Generator) -> "Image.Image":
        top, left, h, w = self.get_params(*image.size, rng)
        box = image.crop((left, top, left + w, top + h))
        return box.resize((self.size, self.size), getattr(pil().Resampling, self.interpolation.upper()))


@dataclass(frozen=True)
class RandomCrop:
    """Zero padding on every side, then a size x size crop at a uniform offset (TorchVision's definition)."""

    size: int
    padding: int = 4

    def get_params(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int]:
        """(top, left) of the crop in the padded image of width x height."""
        if height < self.size or width < self.size:
            raise ValueError(f"a {self.size}x{self.size} crop does not fit in {width}x{height} (after padding)")
        if width == self.size and height == self.size:
            return 0, 0
        return int(rng.integers(0, height - self.size + 1)), int(rng.integers(0, width - self.size + 1))

    def __call__(self, image: "Image.Image", rng: np.random.Generator) -> "Image.Image":
        if self.padding:
            from PIL import ImageOps

            image = ImageOps.expand(image, border=self.padding, fill=0)
        top, left = self.get_params(*image.size, rng)
        return image.crop((left, top, left + self.size, top + self.size))


@dataclass(frozen=True)
class RandomHorizontalFlip:
    p: float = 0.5

    def __call__(self, image: "Image.Image", rng: np.random.Generator) -> "Image.Image":
        if rng.random() < self.p:
            return image.transpose(pil().Transpose.FLIP_LEFT_RIGHT)
        return image


@dataclass(frozen=True)
class TrainTransform:
    """TorchVision's training preset for classification, as a value.

    stem "imagenet": RandomResizedCrop(size) -> RandomHorizontalFlip -> ToTensor -> Normalize
    (``references/classification/presets.py``, ``ClassificationPresetTrain`` without auto-augment).
    stem "cifar": images not already size x size are first resized (shorter side) and center
    cropped to it; then RandomCrop(size, padding) -> RandomHorizontalFlip -> ToTensor -> Normalize
    (TorchVision's CIFAR recipe pads 4 at 32x32; the default padding keeps that share at other sizes).
    """

    size: int = 224
    stem: str = IMAGENET_STEM
    padding: int | None = None  # RandomCrop's, for stem "cifar": default size // 8, TorchVision's 4 at 32x32
    hflip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be positive, not {self.size}")
        if self.stem not in (IMAGENET_STEM, CIFAR_STEM):
            raise ValueError(f"stem must be {IMAGENET_STEM!r} or {CIFAR_STEM!r}, not {self.stem!r}")

    @property
    def eval_preset(self) -> ImageClassification:
        """What validation uses for this stem at this size (no randomness)."""
        if self.stem == CIFAR_STEM:
            return ImageClassification(crop_size=self.size, resize_size=self.size, mean=self.mean, std=self.std)
        # TorchVision's ratio: resize 256 for a 224 crop.
        return ImageClassification(crop_size=self.size, resize_size=round(self.size * 256 / 224), mean=self.mean, std=self.std)

    def augment(self, image: "Image.Image", rng: np.random.Generator) -> "Image.Image":
        """An RGB PIL image -> the size x size RGB PIL image the network will see."""
        if self.stem == CIFAR_STEM:
            if image.size != (self.size, self.size):
                preset = self.eval_preset
                image = pil().fromarray(preset.resize_and_crop(image))
            padding = self.padding if self.padding is not None else max(1, self.size // 8)
            image = RandomCrop(self.size, padding)(image, rng)
        else:
            image = RandomResizedCrop(self.size)(image, rng)
        return RandomHorizontalFlip(self.hflip_prob)(image, rng)

    def __call__(self, image: Any, rng: np.random.Generator) -> np.ndarray:
        """One image (path, bytes, PIL image, uint8 array) -> (3, size, size) float32; ImageError if unreadable."""
        rgb = load_image(image)
        try:
            pixels = np.asarray(self.augment(rgb, rng), dtype=np.uint8)  # (size, size, 3)
        except (ValueError, OSError, MemoryError) as exc:
            raise ImageError(f"{describe(image)}: {exc}") from None
        return ImageClassification(mean=self.mean, std=self.std).normalize(pixels)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation stream of sample `index` in `epoch`: the same whichever thread draws it."""
    return np.random.default_rng([seed, epoch, SAMPLE_STREAM, index])


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of `epoch`."""
    return np.random.default_rng([seed, epoch, SHUFFLE_STREAM, 0]).permutation(num_samples)


# --- batches -----------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    images: np.ndarray  # (B, 3, H, W) float32
    labels: np.ndarray  # (B,) int64
    errors: list[tuple[str, str]]  # (path, message) of the images left out


class BatchLoader:
    """Batches of one ImageFolder, prepared by a thread pool ahead of use.

    transform(image, rng) -> (3, H, W) float32: a TrainTransform, or an ImageClassification
    (which ignores rng). shuffle=True draws each epoch's order from the seed. A batch
    whose every image is bad is skipped. Use as a context manager, or call close().
    """

    def __init__(
        self,
        folder: ImageFolder,
        transform: Callable[..., np.ndarray],
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        workers: int | None = None,
        prefetch: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, not {seed}")
        self.folder = folder
        if isinstance(transform, ImageClassification):
            preset = transform
            transform = lambda image, rng: preset(image)  # noqa: E731 (no randomness to draw)
        self.transform = transform
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.prefetch = prefetch or 2 * self.workers
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="npresnet-data")

    def __len__(self) -> int:
        """Batches per epoch (the last one may be smaller)."""
        return math.ceil(len(self.folder) / self.batch_size)

    def batch_indices(self, epoch: int) -> list[np.ndarray]:
        order = epoch_order(len(self.folder), self.seed, epoch) if self.shuffle else np.arange(len(self.folder))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _load(self, epoch: int, indices: np.ndarray) -> Batch:
        images, labels, errors = [], [], []
        for index in indices:
            path, label = self.folder.samples[index]
            try:
                images.append(self.transform(path, sample_rng(self.seed, epoch, int(index))))
                labels.append(label)
            except ImageError as exc:
                errors.append((path, str(exc)))
        if not images:
            return Batch(np.zeros((0, 3, 0, 0), np.float32), np.zeros(0, np.int64), errors)
        return Batch(np.stack(images), np.asarray(labels, dtype=np.int64), errors)  # (B, 3, H, W)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        """(batch number, Batch) for batches start, start+1, ... of `epoch`, prefetched."""
        pending: deque[tuple[int, Future]] = deque()
        todo = iter(list(enumerate(self.batch_indices(epoch)))[start:])
        try:
            while True:
                while len(pending) < self.prefetch:
                    item = next(todo, None)
                    if item is None:
                        break
                    pending.append((item[0], self._pool.submit(self._load, epoch, item[1])))
                if not pending:
                    return
                number, future = pending.popleft()
                yield number, future.result()
        finally:
            for _, future in pending:
                future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
