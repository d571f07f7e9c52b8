"""Images in, (N, 3, H, W) float32 batches out: TorchVision's ImageNet classification preset.

``ImageClassification`` is the value TorchVision's ``weights.transforms()`` returns
for every ResNet (``torchvision/transforms/_presets.py``), done on PIL images the
same way, step for step, so that the tensor, and so the answer, is the same:

1. resize so that the shorter side becomes ``resize_size`` with PIL's bilinear
   filter; the longer side becomes ``int(resize_size * long / short)``
   (``torchvision.transforms.functional._compute_resized_output_size``);
2. center crop ``crop_size``: ``top = int(round((height - crop) / 2.0))``,
   ``left`` likewise (Python's round: halves go to the even integer), padding
   with zeros first where the image is smaller (``functional.center_crop``);
3. scale the uint8 values to [0, 1] (``x / 255`` in float32) and normalise
   with the ImageNet mean and standard deviation, in float32 as torch does.

Images are read as TorchVision's loader reads them (``Image.open(f).convert("RGB")``):
L, LA, P, PA, RGBA, CMYK, YCbCr... become RGB as PIL converts them; alpha is
dropped, not composited. Two deliberate departures, both documented here:

* 16-bit images (modes I;16*, and I, the mode older Pillow gives 16-bit PNGs)
  are scaled to 8 bits as ``value >> 8``. PIL's own ``convert("RGB")`` clips
  every value above 255 to white, which turns a 16-bit photo into a white sheet.
* EXIF orientation is ignored by default, as TorchVision ignores it: the same
  file then gives the same tensor, and the same answer, as TorchVision does. A
  phone photo stored on its side is therefore classified on its side;
  ``ImageClassification(exif_transpose=True)`` (``--exif-transpose`` on the
  command line) rotates it upright first, at the cost of that equality.

Models fine-tuned with a plain ``Resize((height, width))`` (common in third-party checkpoints)
saw whole images squashed to that size, without the crop: ``squash_size=(height, width)``
(``--resize HEIGHTxWIDTH`` on the command line) replaces steps 1 and 2 by that resize, PIL's
bilinear filter on the whole image, as TorchVision's ``Resize`` does on a PIL image.

Pillow is imported when an image is first read, not with npresnet: the model, the weights
and already preprocessed arrays need only NumPy.

Unreadable input raises ``ImageError`` naming the image, whatever Pillow's decoder raised
(OSError, ValueError, SyntaxError, RuntimeError, struct.error...). Files are opened only as
one of ``IMAGE_FORMATS``, all decoded in-process (never EPS/PS, which Pillow hands to
Ghostscript). Decompression bombs are errors, not warnings: PIL's pixel limit
(DecompressionBombWarning as well as its Error), and any file that would decode to more than
64 MiB at over ``MAX_DECODED_RATIO`` bytes per byte of file (a header that claims a huge
image over little data), refused before Pillow allocates the pixels.
"""
from __future__ import annotations

import dataclasses
import io
import os
import struct
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

from .errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_SIZE = 224
DEFAULT_RESIZE_SIZE = 256

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")  # PIL's resampling filters of these names
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Formats Pillow decodes in-process with its own code or linked libraries; EPS/PS (Ghostscript) and
# anything else that runs an external program are left out, as are rarely seen legacy formats.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "AVIF")
# Deflate inflates at most ~1032:1 and a photo's JPEG a few hundred to one; beyond that a file
# is a header claiming pixels it does not hold.
MAX_DECODED_RATIO = 1024
DECODED_SLACK = 64 << 20
# What Pillow's decoders raise for corrupt data, beside OSError (their messages vary by format).
DECODER_ERRORS = (OSError, ValueError, TypeError, SyntaxError, RuntimeError, struct.error, EOFError, IndexError,
                  KeyError, ZeroDivisionError, OverflowError, MemoryError)


def pil():
    """PIL's Image module, imported on first use so that the rest of npresnet runs without Pillow."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(f"reading images needs Pillow ({exc}): pip install pillow") from exc
    return Image


def is_pil_image(value: Any) -> bool:
    """Whether `value` is a PIL image; PIL is not imported for this (no PIL image exists before it is)."""
    Image = sys.modules.get("PIL.Image")
    return Image is not None and isinstance(value, Image.Image)


@dataclass(frozen=True)
class ImageClassification:
    """TorchVision's ImageNet classification preset, as a value.

    ResNet weights want crop_size=224 with resize_size=256 (IMAGENET1K_V1) or
    232 (IMAGENET1K_V2); ``preset_for(model)`` reads them from the model's metadata.
    squash_size=(height, width) resizes the whole image to exactly that instead (no crop; the
    aspect ratio is not kept), as TorchVision's ``Resize((height, width))``.
    """

    crop_size: int = DEFAULT_CROP_SIZE
    resize_size: int = DEFAULT_RESIZE_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    exif_transpose: bool = False
    squash_size: tuple[int, int] | None = None

    def __post_init__(self):
        if self.crop_size < 1 or self.resize_size < 1:
            raise ValueError(f"crop_size and resize_size must be positive, not {self.crop_size}, {self.resize_size}")
        if self.squash_size is not None:
            size = tuple(self.squash_size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"squash_size must be (height, width), both positive, not {self.squash_size!r}")
            object.__setattr__(self, "squash_size", (int(size[0]), int(size[1])))

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the arrays this preset makes."""
        return self.squash_size or (self.crop_size, self.crop_size)
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per RGB channel")

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step: the shorter side becomes resize_size."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the center crop in an image already padded to at least crop_size."""
        crop = self.crop_size
        top = int(round((height - crop) / 2.0))
        left = int(round((width - crop) / 2.0))
        return left, top, left + crop, top + crop

    def resize_and_crop(self, image: "Image.Image") -> np.ndarray:
        """An RGB PIL image -> the (crop, crop, 3) uint8 array the network will see ((height, width, 3) squashed)."""
        Image = pil()
        resample = getattr(Image.Resampling, self.interpolation.upper())
        if self.squash_size is not None:
            height, width = self.squash_size
            return np.asarray(image.resize((width, height), resample), dtype=np.uint8)
        width, height = self.resized_size(*image.size)
        if width * height > Image.MAX_IMAGE_PIXELS:
            # A long thin strip would grow past PIL's own decompression-bomb limit.
            raise ValueError(f"resizing {image.size[0]}x{image.size[1]} to {width}x{height} is too large")
        image = image.resize((width, height), resample)
        pixels = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        pixels = _pad_to(pixels, self.crop_size)
        left, top, right, bottom = self.crop_box(pixels.shape[1], pixels.shape[0])
        return pixels[top:bottom, left:right]

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (3, H, W) float32: x / 255, then (x - mean) / std, in float32 as torch."""
        x = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)  # (3, H, W)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return (x - mean) / std

    def __call__(self, image: Any) -> np.ndarray:
        """One image (path, bytes, PIL image or uint8 array) -> (3, crop_size, crop_size) float32 (or 3 x squash_size)."""
        name = describe(image)
        rgb = load_image(image, exif_transpose=self.exif_transpose)
        try:
            return self.normalize(self.resize_and_crop(rgb))
        except (ValueError, OSError, MemoryError) as exc:
            raise ImageError(f"{name}: {exc}") from None


def _pad_to(pixels: np.ndarray, crop: int) -> np.ndarray:
    """Zero-pad (H, W, 3) to at least crop x crop: the smaller half before, the larger after (TorchVision)."""
    height, width = pixels.shape[:2]
    pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
    if pad_h == 0 and pad_w == 0:
        return pixels
    return np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))


def describe(image: Any) -> str:
    """How an image is named in messages: its path, or what kind of value it is."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes>"
    if is_pil_image(image):
        return f"<PIL image {image.mode} {image.size[0]}x{image.size[1]}>"
    if isinstance(image, np.ndarray):
        return f"<array {image.dtype} {image.shape}>"
    return f"<{type(image).__name__}>"


def _open(image: Any) -> "Image.Image":
    Image = pil()
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        if os.path.isdir(image):
            raise IsADirectoryError("is a directory, not an image")
        with open(image, "rb") as f:
            data = f.read()
        return _open_bytes(data)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"an image array must be uint8 (H, W, 3) RGB, not {image.dtype}")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)):
            return Image.fromarray(np.ascontiguousarray(image))  # L, RGB or RGBA
        raise ValueError(f"an image array must have shape (H, W, 3), not {image.shape}")
    raise TypeError(f"expected a path, bytes, a PIL image or a uint8 array, not {type(image).__name__}")


def _open_bytes(data: bytes) -> "Image.Image":
    """Identify and check an encoded image (header only: no pixels are decoded yet)."""
    Image = pil()
    opened = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    width, height = opened.size
    bytes_per_pixel = len(opened.getbands()) * (4 if opened.mode in ("I", "F") else 2 if opened.mode.startswith("I;16") else 1)
    decoded = width * height * bytes_per_pixel
    if decoded > DECODED_SLACK and decoded > MAX_DECODED_RATIO * len(data):
        raise Image.DecompressionBombError(
            f"{width}x{height} {opened.mode} pixels ({decoded} bytes) from a file of {len(data)} bytes"
        )
    return opened


def to_rgb(image: "Image.Image") -> "Image.Image":
    """Any PIL mode -> RGB, as TorchVision's loader does, except 16-bit data, scaled by >> 8."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image)  # uint16, or int32 for mode I: no wider copy of a large image
        image = pil().fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))  # L
    return image.convert("RGB")


def load_image(image: Any, exif_transpose: bool = False) -> "Image.Image":
    """A path, bytes, PIL image or uint8 array -> a fully decoded RGB PIL image.

    Raises ImageError naming the image for anything unreadable: a missing file,
    a zero-byte or truncated file, a format PIL cannot identify, a decompression bomb.
    """
    name = describe(image)
    Image = pil()
    from PIL import ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # PIL's advice to go through RGBA changes nothing here: alpha is dropped either way.
            warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
            opened = _open(image)
            opened.load()  # decode now: a truncated file fails here, not later
            if exif_transpose:
                opened = ImageOps.exif_transpose(opened)
            return to_rgb(opened)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except UnidentifiedImageError:
        size = len(image) if isinstance(image, (bytes, bytearray)) else _file_size(image)
        what = "empty file (0 bytes)" if size == 0 else f"not an image in a format npresnet reads ({', '.join(IMAGE_FORMATS)})"
        raise ImageError(f"{name}: {what}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: refused as a possible decompression bomb ({exc})") from None
    except DECODER_ERRORS as exc:
        what = "truncated image file" if "truncated" in str(exc).lower() else "cannot read image"
        cause = f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else str(exc)
        raise ImageError(f"{name}: {what} ({cause[:200]})") from None


def _file_size(image: Any) -> int | None:
    if isinstance(image, (str, os.PathLike)):
        try:
            return os.path.getsize(image)
        except OSError:
            return None
    return None


def preset_for(model: Any, **changes) -> ImageClassification:
    """The preset a model's weights want, from model.meta["crop_size"] / ["resize_size"] (else 224 / 256)."""
    meta = getattr(model, "meta", None) or {}
    preset = ImageClassification(
        crop_size=int(meta.get("crop_size", DEFAULT_CROP_SIZE)),
        resize_size=int(meta.get("resize_size", DEFAULT_RESIZE_SIZE)),
    )
    return dataclasses.replace(preset, **changes)


def preprocess(images: Iterable[Any], preset: ImageClassification | None = None) -> np.ndarray:
    """Images (paths, bytes, PIL images, uint8 arrays) -> (N, 3, crop, crop) float32; ImageError on the first bad one."""
    preset = preset or ImageClassification()
    arrays = [preset(image) for image in images]
    if not arrays:
        return np.zeros((0, 3, *preset.output_size), dtype=np.float32)
    return np.stack(arrays)  # (N, 3, crop, crop)
