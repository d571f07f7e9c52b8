"""Calibrated post-training INT8: quantize a ResNet, run the quantized network, read and write its file.

    import npresnet
    model = npresnet.load("resnet50.npz")
    int8 = npresnet.quantize(model, ["calibration/a.jpg", ...], method="entropy", samples=256)
    npresnet.save(int8, "resnet50_int8.npz")          # about 0.26x the float32 file
    int8 = npresnet.load("resnet50_int8.npz")          # a QuantizedResNet; classify, embed and the CLI take it

What is quantized, in the QDQ (QuantizeLinear / DequantizeLinear) form that ONNX runtimes fuse into int8 kernels:
- Every convolution, batch norm folded in first (``functional.fold_batch_norm``, float64, then float32):
  weights int8, symmetric per output channel (scale_k = max|w_k| / 63, zero point 0: 7 bits of the
  int8, see WEIGHT_QMAX for why); bias int32 with
  scale input_scale * scale_k and zero point 0, as ONNX's QLinearConv takes it; the input quantized per tensor;
  the output quantized per tensor, so that a runtime can run the conv as one int8 kernel (QLinearConv).
- fc: weights int8 per output row, bias int32 likewise, its input (the pooled features) per tensor; logits float32.
- The residual add, ReLU, max pool and average pool run in float32 on dequantized values, as the QDQ graph does.

Activation types, all with zero point 0:
- uint8 for the tensors that are >= 0: every conv input after the stem's (ReLU outputs), every conv output
  a ReLU follows, the fc input. uint8 rather than int8 symmetric because a ReLU output has no negative half
  to spend levels on: 256 levels over [0, max] instead of 128, half the rounding error. Its quantizer
  saturates at 0, so it is itself the ReLU (the float ReLU after it changes nothing).
- int8 symmetric for the signed ones: the network input (normalised pixels) and the outputs of the convs
  the residual add follows (a block's last conv, downsample).
onnxruntime fuses a conv with a uint8 input and an int8 output into QLinearConv as readily as uniform types.

Semantics: quantize and dequantize are exactly ONNX's QuantizeLinear / DequantizeLinear
(``functional.quantize_linear``: round half to even, saturation to the type's range). The runtime here
computes the QDQ graph's own definition: float32 convolutions (``functional.conv2d``) on the dequantized
weights, biases and activations, with every activation passed through quantize-then-dequantize where the
graph has a QuantizeLinear (fake quantization). onnxruntime's int8 kernels compute the same up to the
float rounding of their int32 -> output rescale, so that the two agree on nearly every prediction.
It runs on the NumPy backend only: no compiled int8 kernel is faster than float32 BLAS on an AVX2 CPU
without VNNI (numpy's integer matmul is not BLAS; bench/ has the figures).

Calibration (``quantize``): the float model, batch norm folded, runs on the calibration images
preprocessed as at inference (the model's preset); every quantized activation is observed, and its
scale is threshold / qmax (127 for int8, 255 for uint8; 1.0 for a tensor that was always 0). The
threshold, from |x| (int8) or the positive x (uint8: a ReLU's zeros are exact at any scale), per method:
- "minmax": the largest value seen.
- "percentile": the `percentile`-th percentile (99.99 by default), the upper edge of its histogram bin.
- "entropy": the clipping threshold whose quantized histogram is closest to the observed one in
  Kullback-Leibler divergence (Migacz, "8-bit Inference with TensorRT", GTC 2017; onnxruntime's
  ``calibrate.py`` and MXNet's ``_get_optimal_threshold`` do the same).
Histograms have 2048 bins over [0, R]; when a batch exceeds R, R doubles and pairs of bins merge, which
is exact, so the result does not depend on how the images are batched beyond R's starting point.
Percentile and entropy thresholds never exceed the largest value seen (the minmax threshold).

The file (an .npz; ``np.load(path, allow_pickle=False)`` reads every entry), <conv> being a conv's
TorchVision name (conv1, layer1.0.conv1, layer2.0.downsample.0, ...):
    __meta__                    JSON: quantized (true), format (1), arch, num_classes, stem, method,
                                samples (images calibrated on), percentile (that method only), and the
                                float model's facts (weights, source, crop_size, resize_size) where known
    <conv>.weight_quantized     int8 (K, C/G, R, S) in [-63, 63], batch norm folded in
    <conv>.weight_scale         float32 (K,)
    <conv>.bias_quantized       int32 (K,), scale <conv>.input_scale * <conv>.weight_scale
    <conv>.input_scale          float32 ()      <conv>.input_zero_point    int8 or uint8 () = 0
    <conv>.output_scale         float32 ()      <conv>.output_zero_point   int8 or uint8 () = 0
    fc.weight_quantized         int8 (num_classes, num_features); fc.weight_scale float32 (num_classes,)
    fc.bias_quantized           int32 (num_classes,), scale fc.input_scale * fc.weight_scale
    fc.input_scale              float32 ()      fc.input_zero_point        uint8 () = 0
A zero point's dtype is its tensor's quantized type, as in ONNX. Float code paths refuse this file
with a message (``weights.refuse_quantized``); ``npresnet.load`` dispatches on meta["quantized"].

References: ONNX operators QuantizeLinear, DequantizeLinear, QLinearConv (https://onnx.ai/onnx/operators/);
onnxruntime's quantization tool (QDQ format, ``calibrate.py``); Jacob et al., "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference" (2017); Migacz (above).
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from . import functional as F
from .backends import Backend, BackendUnavailable, NumpyBackend
from .errors import DataError
from .model import SpecProperties, check_input
from .predict import _batches
from .specs import IMAGENET_STEM, ConvSpec, ResNetSpec, all_convs, block_convs, infer_spec, stem_conv
from .weights import WeightsError

FORMAT = 1
METHODS = ("minmax", "percentile", "entropy")
DEFAULT_METHOD = "minmax"
DEFAULT_SAMPLES = 256
DEFAULT_PERCENTILE = 99.99
HISTOGRAM_BINS = 2048
INT8 = np.dtype(np.int8)
# Weights use [-63, 63] of int8 ("reduce_range" in onnxruntime's quantizer). On x86 CPUs without VNNI
# (AVX2, AVX-512F), onnxruntime's uint8 x int8 kernels add pairs of products in int16 (vpmaddubsw),
# which saturates when two activations near 255 meet two weights near 127: measured here on the
# trained digits resnet18, the fused int8 graph then agreed with its own unfused QDQ graph (and with
# npresnet) on 95.1% of held-out images; with 7-bit weights on 99.9%, at the same accuracy.
WEIGHT_QMAX = 63
UINT8 = np.dtype(np.uint8)
FC = "fc"


# --- the quantized parameters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedConv:
    """One conv (batch norm folded) in int8: what the file stores for it, and its layout."""

    weight: np.ndarray  # int8 (K, C/G, R, S)
    weight_scale: np.ndarray  # float32 (K,)
    bias: np.ndarray  # int32 (K,), scale input_scale * weight_scale
    input_scale: np.ndarray  # float32 ()
    input_dtype: np.dtype  # INT8 or UINT8
    output_scale: np.ndarray | None  # float32 (); None for fc, whose logits stay float
    output_dtype: np.dtype | None
    stride: int = 1
    padding: int = 0
    groups: int = 1

    @property
    def bias_scale(self) -> np.ndarray:
        """(K,) float32: input_scale * weight_scale, the product ONNX's QLinearConv defines the bias in."""
        return (self.input_scale * self.weight_scale).astype(np.float32)

    def dequantized(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) in float32, as DequantizeLinear gives them (per output channel, axis 0)."""
        weight = F.dequantize_linear(self.weight, self.weight_scale, np.int8(0), axis=0)
        bias = F.dequantize_linear(self.bias, self.bias_scale, np.int32(0), axis=0)
        return weight, bias

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """The file's entries for this conv (see the module docstring)."""
        arrays = {
            f"{name}.weight_quantized": self.weight,
            f"{name}.weight_scale": self.weight_scale,
            f"{name}.bias_quantized": self.bias,
            f"{name}.input_scale": self.input_scale,
            f"{name}.input_zero_point": np.zeros((), self.input_dtype),
        }
        if self.output_dtype is not None:
            arrays[f"{name}.output_scale"] = self.output_scale
            arrays[f"{name}.output_zero_point"] = np.zeros((), self.output_dtype)
        return arrays


def activation_types(spec: ResNetSpec) -> dict[str, tuple[np.dtype, np.dtype]]:
    """conv name -> (input type, output type): int8 where the tensor is signed, uint8 where it is >= 0.

    The network input is signed; every later conv input is a ReLU output. A conv's output is a ReLU's
    input (uint8: the quantizer is the ReLU) unless the residual add follows it (int8).
    """
    types = {stem_conv(spec).conv: (INT8, UINT8)}
    for b in spec.blocks():
        convs = block_convs(b)
        roles = [r for r in ("conv1", "conv2", "conv3") if r in convs]
        for role in roles[:-1]:
            types[convs[role].conv] = (UINT8, UINT8)
        types[convs[roles[-1]].conv] = (UINT8, INT8)
        if "downsample" in convs:
            types[convs["downsample"].conv] = (UINT8, INT8)
    return types


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel (axis 0): scale_k = max|w_k| / WEIGHT_QMAX (1.0 for an all-zero channel).

    weight: (K, ...) float. Returns (int8 array of weight's shape, float32 (K,) scales).
    """
    absmax = np.abs(weight.astype(np.float64)).reshape(weight.shape[0], -1).max(axis=1)
    scale = (absmax / WEIGHT_QMAX).astype(np.float32)
    scale[scale == 0] = 1.0
    return F.quantize_linear(weight.astype(np.float32), scale, np.int8(0), axis=0), scale


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int32 bias in units of `scale` (K,) = input_scale * weight_scale: round half to even, saturated."""
    info = np.iinfo(np.int32)
    return np.clip(np.rint(bias.astype(np.float64) / scale.astype(np.float64)), info.min, info.max).astype(np.int32)


def fake_quantize(x: np.ndarray, scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x, scale, zero point 0 of `dtype`)), per tensor, in x's dtype.

    The same values as the two ONNX ops, computed without an integer copy: x / scale, round half to
    even, clip to the type's range, times scale. x: any shape. Returns a new array.
    """
    info = np.iinfo(dtype)
    scale = np.asarray(scale, dtype=x.dtype)
    q = x / scale
    np.rint(q, out=q)
    np.clip(q, info.min, info.max, out=q)
    q *= scale
    return q


# --- one forward walk, for calibration and for the quantized network --------------------------------------------

ConvFn = Callable[[np.ndarray, ConvSpec, bool], np.ndarray]  # (x, conv, relu) -> output


def forward(
    x: np.ndarray, spec: ResNetSpec, conv: ConvFn, linear: Callable[[np.ndarray], np.ndarray], keep_features: bool = False
):
    """The ResNet forward pass over `conv` and `linear`, as the QDQ graph orders it (see the module doc).

    conv(x, c, relu) runs conv c (batch norm folded) and the ReLU when relu is true; the residual add and
    its ReLU run here in float32. Returns logits (N, num_classes), or with keep_features the maps
    stem, layer1..layer4 and pool, as ResNet.features does.
    """
    features = {}
    h = conv(x, stem_conv(spec), True)  # (N, 64, H/2, W/2)
    features["stem"] = h
    if spec.stem == IMAGENET_STEM:
        h = F.max_pool2d(h)  # (N, 64, H/4, W/4)
    for stage, blocks in itertools.groupby(spec.blocks(), key=lambda b: b.prefix.split(".")[0]):
        for b in blocks:
            convs = block_convs(b)
            identity = conv(h, convs["downsample"], False) if "downsample" in convs else h
            roles = [r for r in ("conv1", "conv2", "conv3") if r in convs]
            out = h
            for role in roles[:-1]:
                out = conv(out, convs[role], True)
            out = conv(out, convs[roles[-1]], False)
            h = F.relu(out + identity)  # a new array: calibration tells tensors apart by identity
        features[stage] = h
    pooled = F.adaptive_avg_pool2d(h, 1).reshape(h.shape[0], h.shape[1])  # (N, 512 * expansion)
    if keep_features:
        features["pool"] = pooled
        return features
    return linear(pooled)  # (N, num_classes)


# --- calibration ------------------------------------------------------------------------------------------------


class TensorObserver:
    """What calibration keeps of one activation tensor: its largest magnitude and, for percentile and
    entropy, a histogram of magnitudes (|x| for int8; for uint8, whose quantizer clips at 0, the x > 0)."""

    def __init__(self, dtype: np.dtype, histogram: bool = True, bins: int = HISTOGRAM_BINS):
        self.dtype = np.dtype(dtype)
        self.max = 0.0
        self.bins = bins
        self.histogram = np.zeros(bins, dtype=np.int64) if histogram else None
        self.range = 0.0  # the histogram covers [0, range]
        self.zeros = 0  # values seen while range was still 0 (all of them zero)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.dtype).max)

    def observe(self, x: np.ndarray) -> None:
        # uint8 (a ReLU's output): only the positive values. Its zeros quantize to 0 at any scale, so they
        # say nothing about the threshold, and their spike, in the histogram, would make entropy favour the
        # narrowest range (where the first level is one bin wide, so the spike is represented exactly).
        magnitude = np.abs(x) if self.dtype == INT8 else x[x > 0]
        top = float(magnitude.max()) if magnitude.size else 0.0
        if not np.isfinite(top):
            raise DataError("calibration: an activation is not finite (NaN or inf in the input or the weights)")
        self.max = max(self.max, top)
        if self.histogram is None:
            return
        if top == 0 and self.range == 0:
            self.zeros += magnitude.size
            return
        if self.range == 0:
            self.range = top
            self.histogram[0] += self.zeros
        while top > self.range:
            # Double the range: bin pairs merge exactly into the lower half, the upper half starts empty.
            merged = self.histogram.reshape(-1, 2).sum(axis=1)
            self.histogram = np.concatenate([merged, np.zeros(self.bins - merged.size, dtype=np.int64)])
            self.range *= 2
        self.histogram += np.histogram(magnitude, bins=self.bins, range=(0.0, self.range))[0]

    def threshold(self, method: str, percentile: float = DEFAULT_PERCENTILE) -> float:
        """The clipping threshold `method` picks (see the module doc); never above the largest value seen."""
        if method == "minmax" or self.max == 0:
            return self.max
        if self.histogram is None:
            raise ValueError(f"method {method!r} needs a histogram; this observer kept only the maximum")
        width = self.range / self.bins
        if method == "percentile":
            cdf = np.cumsum(self.histogram)
            index = int(np.searchsorted(cdf, cdf[-1] * percentile / 100.0))  # first bin reaching the percentile
            return min((index + 1) * width, self.max)
        if method == "entropy":
            return min(entropy_bins(self.histogram, self.qmax + 1) * width, self.max)
        raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")

    def scale(self, method: str, percentile: float = DEFAULT_PERCENTILE) -> np.ndarray:
        """threshold / qmax as a float32 scalar; 1.0 for a tensor that was always 0 (any scale represents it)."""
        threshold = self.threshold(method, percentile)
        return np.float32(threshold / self.qmax if threshold > 0 else 1.0)


def entropy_bins(histogram: np.ndarray, levels: int, chunk: int = 128) -> int:
    """How many of the histogram's bins to keep so that `levels` quantization levels lose the least information.

    For every candidate i >= levels: the reference distribution P is the first i bins, the mass beyond
    them added to the last (clipping); Q is those i bins merged into `levels` groups, each group's mass
    spread evenly over its non-empty bins (quantizing, then dequantizing). The i of least KL(P || Q)
    wins (the first, on a tie). Zeros of Q where P is not zero count as 1e-4, so that clipping a tail is
    a finite cost. Candidates are evaluated `chunk` at a time as (chunk, bins) arrays; the tests hold a
    one-candidate-at-a-time loop of the same definition beside it.
    """
    hist = histogram.astype(np.float64)
    nbins = hist.size
    if nbins <= levels:
        return nbins
    total = hist.sum()
    if total == 0:
        return nbins
    cumulative = np.concatenate([[0.0], np.cumsum(hist)])  # cumulative[i] = mass of bins 0..i-1
    filled_cumulative = np.concatenate([[0], np.cumsum(hist > 0)])
    best_bins, best_divergence = nbins, np.inf
    for first in range(levels, nbins + 1, chunk):
        i = np.arange(first, min(first + chunk, nbins + 1))  # (M,) candidates
        width = int(i[-1])  # bins at or beyond every candidate's i are empty in P and Q: left out
        bins = np.arange(width)
        # Group j of candidate i holds bins floor(j*i/levels) .. floor((j+1)*i/levels) - 1, so bin b
        # is in group ceil((b+1)*levels/i) - 1.
        edges = (np.arange(levels + 1) * i[:, None]) // levels  # (M, levels + 1)
        mass = cumulative[edges[:, 1:]] - cumulative[edges[:, :-1]]  # (M, levels)
        filled = filled_cumulative[edges[:, 1:]] - filled_cumulative[edges[:, :-1]]
        group = np.minimum(((bins + 1) * levels + i[:, None] - 1) // i[:, None] - 1, levels - 1)  # (M, width)
        kept = bins < i[:, None]
        spread = np.take_along_axis(mass / np.maximum(filled, 1), group, axis=1)
        q = np.where(kept & (hist[:width] > 0), spread / cumulative[i][:, None], 0.0)  # Q, normalised
        p = np.where(kept, hist[:width], 0.0)
        p[np.arange(i.size), i - 1] += total - cumulative[i]  # the clipped tail joins the last bin
        p /= total
        ratio = np.where(p > 0, p / np.where(q > 0, q, 1e-4), 1.0)
        divergence = np.sum(p * np.log(ratio), axis=1)  # (M,)
        best = int(np.argmin(divergence))
        if divergence[best] < best_divergence:
            best_bins, best_divergence = int(i[best]), float(divergence[best])
    return best_bins


class Calibration:
    """Observers for every quantized activation of one network, keyed "<conv>.input", "<conv>.output", "fc.input".

    A tensor that feeds two places (a ReLU output read by the next conv; a block output read by conv1 and
    downsample) is observed once: the second key becomes an alias of the first, so both get one scale
    and the QDQ graph's back-to-back quantizers agree.
    """

    def __init__(self, histogram: bool):
        self.histogram = histogram
        self.observers: dict[str, TensorObserver] = {}
        self.aliases: dict[str, str] = {}
        self._batch: dict[int, tuple[str, np.ndarray]] = {}  # id -> (key, the array, kept alive so ids stay unique)

    def observe(self, key: str, x: np.ndarray, dtype: np.dtype) -> None:
        seen = self._batch.get(id(x))
        if seen is not None and seen[1] is x and self.observers[seen[0]].dtype == dtype:
            self.aliases[key] = seen[0]
            return
        observer = self.observers.get(key)
        if observer is None:
            observer = self.observers[key] = TensorObserver(dtype, self.histogram)
        observer.observe(x)
        self._batch[id(x)] = (key, x)

    def end_batch(self) -> None:
        self._batch.clear()

    def scale(self, key: str, method: str, percentile: float) -> np.ndarray:
        return self.observers[self.aliases.get(key, key)].scale(method, percentile)


def _calibration_batches(images: Any, model: Any, preset, batch_size: int) -> Iterable[np.ndarray]:
    """(B, 3, H, W) batches: an iterator is taken as yielding them already; anything else goes to predict's reader."""
    if isinstance(images, Iterator):
        return images
    return _batches(images, model, preset, batch_size)


def quantize(
    model: Any,
    calibration_images: Any,
    method: str = DEFAULT_METHOD,
    samples: int = DEFAULT_SAMPLES,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    batch_size: int = 16,
    preset=None,
) -> "QuantizedResNet":
    """The int8 version of `model` (a float ResNet), its activation scales calibrated on images.

    calibration_images: images (paths, bytes, PIL images, uint8 (H, W, 3) arrays), preprocessed with
    the model's preset (or `preset`) as at inference; or an already preprocessed (N, 3, H, W) float
    array; or an iterator (e.g. a generator) yielding such batches (streamed: the CLI passes its reader). The first `samples`
    images are used; fewer is a warning (UserWarning), none is a ValueError. method: "minmax",
    "percentile" (at `percentile`) or "entropy" (see the module doc).
    """
    if isinstance(model, QuantizedResNet):
        raise DataError("the model is already quantized (int8); quantize its float32 weights instead")
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
    if int(samples) < 1:
        raise DataError(f"samples must be at least 1, not {samples}")
    if method == "percentile" and not 0 < percentile <= 100:
        raise DataError(f"percentile must be in (0, 100], not {percentile}")
    spec = model.spec
    state = model.state_dict()
    folded = {}
    for c in all_convs(spec):
        weight, bias = F.fold_batch_norm(
            state[f"{c.conv}.weight"], state[f"{c.bn}.running_mean"], state[f"{c.bn}.running_var"],
            state[f"{c.bn}.weight"], state[f"{c.bn}.bias"],
        )
        folded[c.conv] = (weight.astype(np.float32), bias.astype(np.float32))
    types = activation_types(spec)
    calibration = Calibration(histogram=method != "minmax")

    def observed_conv(x, c: ConvSpec, relu: bool):
        input_type, output_type = types[c.conv]
        calibration.observe(f"{c.conv}.input", x, input_type)
        weight, bias = folded[c.conv]
        y = F.conv2d(x, weight, bias, stride=c.stride, padding=c.padding, groups=c.groups)
        if relu:
            F.relu(y, out=y)
        calibration.observe(f"{c.conv}.output", y, output_type)
        return y

    def observed_linear(pooled):
        calibration.observe(f"{FC}.input", pooled, UINT8)
        return pooled  # the logits are not needed

    used = 0
    for batch in _calibration_batches(calibration_images, model, preset, batch_size):
        if not isinstance(batch, np.ndarray) or batch.ndim != 4 or batch.dtype.kind != "f":
            raise TypeError("calibration batches must be (N, 3, H, W) float arrays")
        batch = np.ascontiguousarray(batch[: samples - used], dtype=np.float32)
        if len(batch):
            forward(batch, spec, observed_conv, observed_linear)
            calibration.end_batch()
            used += len(batch)
        if used >= samples:
            break
    if used == 0:
        raise DataError("no calibration images: quantize needs at least one image to measure activations on")
    if used < samples:
        warnings.warn(f"calibrating on {used} images, fewer than the {samples} asked for", UserWarning, stacklevel=2)

    convs = {}
    for c in all_convs(spec):
        input_type, output_type = types[c.conv]
        input_scale = calibration.scale(f"{c.conv}.input", method, percentile)
        weight, weight_scale = quantize_weight(folded[c.conv][0])
        bias = quantize_bias(folded[c.conv][1], (input_scale * weight_scale).astype(np.float32))
        convs[c.conv] = QuantizedConv(
            weight, weight_scale, bias, input_scale, input_type,
            calibration.scale(f"{c.conv}.output", method, percentile), output_type, c.stride, c.padding, c.groups,
        )
    input_scale = calibration.scale(f"{FC}.input", method, percentile)
    weight, weight_scale = quantize_weight(state["fc.weight"])
    bias = quantize_bias(state["fc.bias"], (input_scale * weight_scale).astype(np.float32))
    convs[FC] = QuantizedConv(weight, weight_scale, bias, input_scale, UINT8, None, None)
    kept = {k: v for k, v in model.meta.items() if k in ("weights", "source", "source_sha256", "crop_size", "resize_size", "classes")}
    meta = {**kept, "quantized": True, "format": FORMAT, "method": method, "samples": used}
    if method == "percentile":
        meta["percentile"] = percentile
    return QuantizedResNet(spec, convs, meta=meta)


# --- the quantized network --------------------------------------------------------------------------------------


class QuantizedResNet(SpecProperties):
    """A ResNet with int8 weights and calibrated activation scales (see the module doc); NumPy backend.

    model(x) -> logits (N, num_classes) float32; model.features(x) -> stem, layer1..layer4, pool.
    x: (N, 3, H, W) float32 (float64 is computed in float32, as the int8 graph defines it).
    """

    quantized = True

    def __init__(
        self,
        spec: ResNetSpec,
        convs: Mapping[str, QuantizedConv],
        *,
        meta: Mapping[str, Any] | None = None,
        backend: str | Backend = "auto",
        threads: int | None = None,
        source: str = "quantized model",
    ):
        name = backend.name if isinstance(backend, Backend) else backend
        if name not in ("auto", "numpy"):
            raise BackendUnavailable(
                f"{source} is an int8 quantized model, which the {name!r} backend cannot run; "
                f"use the 'numpy' backend (or 'auto', which picks it)"
            )
        self.spec = spec
        self.convs = dict(convs)
        self.meta = {**(meta or {}), "quantized": True}
        self.backend = backend if isinstance(backend, Backend) else NumpyBackend(threads)
        self._dequantized = {name: c.dequantized() for name, c in self.convs.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None, *,
                        source: str = "state dict", **options) -> "QuantizedResNet":
        """The model a quantized file's arrays describe (see the module doc), every entry checked."""
        spec, convs = read_quantized_state(state, meta or {}, source)
        return cls(spec, convs, meta=meta, source=source, **options)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The file's arrays (int8 weights, int32 biases, float32 scales, zero points), copied."""
        arrays = {}
        for name, c in self.convs.items():
            arrays.update({k: np.array(v) for k, v in c.arrays(name).items()})
        return arrays

    def __repr__(self) -> str:
        return (
            f"QuantizedResNet(arch={self.spec.name!r}, num_classes={self.spec.num_classes}, stem={self.spec.stem!r}, "
            f"method={self.meta.get('method')!r}, samples={self.meta.get('samples')})"
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, num_classes), float32."""
        return forward(self._check_input(x), self.spec, self._conv, self._linear)

    def features(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The maps of ResNet.features (dequantized, float32): stem, layer1..layer4, pool."""
        return forward(self._check_input(x), self.spec, self._conv, self._linear, keep_features=True)

    def _conv(self, x, c: ConvSpec, relu: bool):
        q = self.convs[c.conv]
        weight, bias = self._dequantized[c.conv]
        x = fake_quantize(x, q.input_scale, q.input_dtype)
        y = F.conv2d(x, weight, bias, stride=c.stride, padding=c.padding, groups=c.groups)
        # uint8 saturates at 0: the output quantizer is the ReLU when one follows (activation_types).
        return fake_quantize(y, q.output_scale, q.output_dtype)

    def _linear(self, pooled):
        q = self.convs[FC]
        weight, bias = self._dequantized[FC]
        return F.linear(fake_quantize(pooled, q.input_scale, q.input_dtype), weight, bias)

    def _check_input(self, x) -> np.ndarray:
        # Checked as the float model checks it; the int8 network computes in float32 whatever comes in.
        return check_input(x).astype(np.float32, copy=False)


def read_quantized_state(
    state: Mapping[str, np.ndarray], meta: Mapping[str, Any], source: str
) -> tuple[ResNetSpec, dict[str, QuantizedConv]]:
    """(spec, conv name -> QuantizedConv) from a quantized file's arrays.

    Raises WeightsError listing every missing, unexpected, mis-shaped or mis-typed entry, and every
    scale that is not a positive finite number or zero point that is not 0, so that one run shows all.
    """
    if meta.get("format", FORMAT) != FORMAT:
        raise WeightsError(f"{source}: quantized file format {meta.get('format')!r}; this npresnet reads format {FORMAT}")
    suffix = ".weight_quantized"
    shapes = {k[: -len(suffix)] + ".weight": tuple(np.shape(v)) for k, v in state.items() if k.endswith(suffix)}
    try:
        spec = infer_spec(shapes)
    except ValueError as exc:
        raise WeightsError(f"{source}: {exc}".replace("'conv1.weight'", "'conv1.weight_quantized'")) from None
    types = activation_types(spec)
    expected: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    layout: dict[str, tuple[int, int, int]] = {}
    for c in all_convs(spec):
        input_type, output_type = types[c.conv]
        expected.update(_expected_entries(c.conv, c.weight_shape, input_type, output_type))
        layout[c.conv] = (c.stride, c.padding, c.groups)
    expected.update(_expected_entries(FC, (spec.num_classes, spec.num_features), UINT8, None))
    problems = [f"  missing entry: {k} ({np.dtype(d).name} {s})" for k, (s, d) in expected.items() if k not in state]
    problems += [f"  unexpected entry: {k}" for k in state if k not in expected]
    for key, (shape, dtype) in expected.items():
        if key not in state:
            continue
        value = np.asarray(state[key])
        if value.shape != shape or value.dtype != dtype:
            problems.append(f"  {key}: expected {np.dtype(dtype).name} {shape}, got {value.dtype.name} {value.shape}")
        elif key.endswith("scale") and not np.all(np.isfinite(value) & (value > 0)):
            problems.append(f"  {key}: scales must be positive and finite")
        elif key.endswith("zero_point") and np.any(value != 0):
            problems.append(f"  {key}: only zero point 0 is supported (symmetric quantization), got {value}")
    if problems:
        raise WeightsError("\n".join([f"{source} is not a valid int8 {spec.name} file:", *problems]))
    convs = {}
    for name in [*layout, FC]:
        stride, padding, groups = layout.get(name, (1, 0, 1))
        output = name != FC
        convs[name] = QuantizedConv(
            np.asarray(state[f"{name}.weight_quantized"]),
            np.asarray(state[f"{name}.weight_scale"]),
            np.asarray(state[f"{name}.bias_quantized"]),
            np.asarray(state[f"{name}.input_scale"]),
            np.asarray(state[f"{name}.input_zero_point"]).dtype,
            np.asarray(state[f"{name}.output_scale"]) if output else None,
            np.asarray(state[f"{name}.output_zero_point"]).dtype if output else None,
            stride, padding, groups,
        )
    return spec, convs


def _expected_entries(name: str, weight_shape, input_type, output_type) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    K = weight_shape[0]
    entries = {
        f"{name}.weight_quantized": (tuple(weight_shape), INT8),
        f"{name}.weight_scale": ((K,), np.dtype(np.float32)),
        f"{name}.bias_quantized": ((K,), np.dtype(np.int32)),
        f"{name}.input_scale": ((), np.dtype(np.float32)),
        f"{name}.input_zero_point": ((), input_type),
    }
    if output_type is not None:
        entries[f"{name}.output_scale"] = ((), np.dtype(np.float32))
        entries[f"{name}.output_zero_point"] = ((), output_type)
    return entries
