"""Seeing what the network looks at: Grad-CAM on layer4, and the heatmap drawn over the photo.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017), with A the output of layer4 (K, h, w)
and y_c the logit of class c (before softmax)::

    alpha_k = mean_ij dy_c / dA_k(i, j)           # (K,)
    cam = relu(sum_k alpha_k A_k)                 # (h, w)

The map is then upsampled to the preprocessed crop the network saw (crop_size
square, not the original photo) as ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)`` does, and divided by its maximum, so that 1 marks the
strongest evidence and 0 none (an all-zero map stays zero).

No backward pass is needed for a ResNet: after layer4 come only the global
average pool and fc, y = W @ mean_ij A(:, i, j) + b, so dy_c/dA_k(i, j) is
W[c, k] / (h w) at every position and alpha_k = W[c, k] / (h w) exactly.

The overlay colours the map with a jet-like ramp of our own (dark blue, blue,
cyan, yellow, red; red only at the maximum), blended half and half with the
crop, above a caption strip naming the class.

References: the paper above; TorchVision's ``ResNet._forward_impl`` (what follows
layer4); PyTorch's ``upsample_bilinear2d`` (``area_pixel_compute_source_index``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .errors import DataError
from .predict import Prediction, labels_for, softmax
from .preprocess import ImageClassification, ImageError, describe, load_image, preset_for
from .weights import atomic_write

if TYPE_CHECKING:  # Pillow is imported where an image is drawn, so that `import npresnet` does without it
    from PIL import Image

# The colour ramp: positions in [0, 1] and the RGB colour at each, linear in between.
RAMP_POSITIONS = (0.0, 0.125, 0.375, 0.625, 1.0)
RAMP_COLOURS = ((0.0, 0.0, 0.5), (0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))
OVERLAY_ALPHA = 0.5  # the heatmap's share of each pixel
CAPTION_HEIGHT = 20  # pixels of the strip below the crop that names the class


def resize_bilinear(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., h, w) -> (..., height, width), as torch's bilinear interpolate with align_corners=False.

    Output pixel o samples the input at max((o + 0.5) * in / out - 0.5, 0), between
    its two nearest input pixels (the last one repeated at the edge).
    """

    def taps(size_in: int, size_out: int):
        source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)  # (size_out,)
        first = np.minimum(source.astype(np.int64), size_in - 1)
        second = np.minimum(first + 1, size_in - 1)
        weight = (source - first).astype(maps.dtype)
        return first, second, weight

    top, bottom, dy = taps(maps.shape[-2], height)
    left, right, dx = taps(maps.shape[-1], width)
    rows = maps[..., top, :] * (1 - dy)[:, None] + maps[..., bottom, :] * dy[:, None]  # (..., height, w)
    return rows[..., left] * (1 - dx) + rows[..., right] * dx  # (..., height, width)


def class_activation(model: Any, x: np.ndarray, class_index: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Grad-CAM for one preprocessed image x (1, 3, H, W): (heatmap (H, W) in [0, 1], logits (num_classes,), class).

    class_index None explains the top class. The heatmap has x's dtype.
    """
    features = model.features(x)
    activations = features["layer4"][0]  # (K, h, w)
    state = model.state_dict()
    fc_weight = state["fc.weight"].astype(x.dtype)  # (num_classes, K)
    logits = features["pool"][0] @ fc_weight.T + state["fc.bias"].astype(x.dtype)  # (num_classes,)
    if class_index is None:
        class_index = int(np.argmax(logits))
    elif not 0 <= class_index < len(logits):
        raise DataError(f"class index {class_index} is out of range: the model has {len(logits)} classes (0..{len(logits) - 1})")
    height, width = activations.shape[1:]
    # d logit_c / d A_k(i, j) = W[c, k] / (h w) everywhere (avgpool then fc), so its spatial mean is that constant.
    alpha = fc_weight[class_index] / (height * width)  # (K,)
    cam = np.maximum(np.tensordot(alpha, activations, axes=1), 0)  # (h, w)
    heatmap = resize_bilinear(cam, x.shape[2], x.shape[3])  # (H, W)
    peak = heatmap.max()
    if peak > 0:
        heatmap = heatmap / peak
    return heatmap, logits, class_index


def _preprocessed(model: Any, image: Any, preset: ImageClassification | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(x (1, 3, H, W), the uint8 crop (H, W, 3) or None): a (3, H, W) float array is taken as already preprocessed."""
    if isinstance(image, np.ndarray) and image.dtype in (np.float32, np.float64):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"a preprocessed image must have shape (3, H, W), not {image.shape}")
        return image[None], None
    preset = preset or preset_for(model)
    rgb = load_image(image, exif_transpose=preset.exif_transpose)
    try:
        pixels = preset.resize_and_crop(rgb)  # (crop, crop, 3)
    except (ValueError, OSError, MemoryError) as exc:
        raise ImageError(f"{describe(image)}: {exc}") from None
    return preset.normalize(pixels)[None], pixels


def gradcam(model: Any, image: Any, class_index: int | None = None, *, preset: ImageClassification | None = None) -> np.ndarray:
    """Grad-CAM on layer4: an (H, W) heatmap in [0, 1] at the preprocessed crop's size (crop_size square).

    image: a path, bytes, a PIL image or a uint8 (H, W, 3) array, preprocessed with
    `preset` (default: the one the model's weights want), or an already preprocessed
    (3, H, W) float32/float64 array. class_index None explains the top class.
    """
    x, _ = _preprocessed(model, image, preset)
    heatmap, _, _ = class_activation(model, x, class_index)
    return heatmap


def colormap(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 RGB on the jet-like ramp (0 dark blue ... 1 red)."""
    t = np.clip(heatmap, 0, 1)
    colours = np.asarray(RAMP_COLOURS)  # (5, 3)
    rgb = np.stack([np.interp(t, RAMP_POSITIONS, colours[:, c]) for c in range(3)], axis=-1)  # (H, W, 3)
    return np.round(rgb * 255).astype(np.uint8)


@dataclass(frozen=True)
class Explanation:
    """One image explained: the crop the network saw, its Grad-CAM heatmap, the explained and the top class."""

    pixels: np.ndarray  # (H, W, 3) uint8
    heatmap: np.ndarray  # (H, W) in [0, 1]
    prediction: Prediction  # the class the heatmap explains
    top: Prediction  # the most probable class

    def render(self) -> "Image.Image":
        """The crop with the heatmap blended over it, and a strip below naming the class: (W, H + CAPTION_HEIGHT)."""
        blend = (1 - OVERLAY_ALPHA) * self.pixels + OVERLAY_ALPHA * colormap(self.heatmap)  # (H, W, 3)
        height, width = self.heatmap.shape
        from PIL import Image, ImageDraw, ImageFont

        canvas = Image.new("RGB", (width, height + CAPTION_HEIGHT))
        canvas.paste(Image.fromarray(np.round(blend).astype(np.uint8)), (0, 0))
        p = self.prediction
        caption = _fit(f"{p.label} ({p.index}) {p.probability:.1%}", width - 4)
        ImageDraw.Draw(canvas).text((2, height + 3), caption, fill=(255, 255, 255), font=ImageFont.load_default())
        return canvas


def _fit(text: str, width: int) -> str:
    """`text`, cut short with an ellipsis where PIL's default font would draw it wider than `width` pixels."""
    from PIL import ImageFont

    font = ImageFont.load_default()
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def explain(
    model: Any,
    image: Any,
    class_index: int | None = None,
    *,
    labels: str | os.PathLike | Sequence[str] | None = None,
    preset: ImageClassification | None = None,
) -> Explanation:
    """Grad-CAM of one image (a path, bytes, a PIL image or a uint8 array) with the classes named; .render() draws it."""
    if isinstance(image, np.ndarray) and image.dtype != np.uint8:
        raise TypeError(f"explain needs the image itself (a uint8 (H, W, 3) array, a path, ...), not a {image.dtype} array")
    names = labels_for(model, labels)
    x, pixels = _preprocessed(model, image, preset)
    heatmap, logits, class_index = class_activation(model, x, class_index)
    probabilities = softmax(logits)
    top = int(np.argmax(probabilities))
    return Explanation(
        pixels=pixels,
        heatmap=heatmap,
        prediction=Prediction(class_index, names[class_index], float(probabilities[class_index])),
        top=Prediction(top, names[top], float(probabilities[top])),
    )


def image_format(path: str | os.PathLike) -> str:
    """The PIL format that writes `path` (by its suffix: .png, .jpg, ...), or DataError naming the suffix."""
    from PIL import Image

    suffix = os.path.splitext(os.fspath(path))[1].lower()
    found = Image.registered_extensions().get(suffix)
    if found is None or found not in Image.SAVE:
        raise DataError(f"{os.fspath(path)}: cannot write a {suffix or 'suffix-less'!r} image; use .png or .jpg")
    return found


def save_image(path: str | os.PathLike, image: "Image.Image") -> None:
    """Write a PIL image, its format by suffix, atomically."""
    fmt = image_format(path)
    atomic_write(path, lambda f: image.save(f, format=fmt))
