"""The NumPy reference ops: pure functions over NCHW arrays.

This module is the specification every compiled kernel is tested against,
and it is itself tested against ``torch.nn.functional``. Each op keeps the
dtype of its input (float32 stays float32, float64 stays float64).

Shape letters, used in every docstring and shape comment:
    N batch, C input channels, H x W input size,
    K output channels, R x S kernel size, P x Q output size, G groups.

References: PyTorch's ``torch.nn.functional`` for semantics; CS231n's
``layers.py`` for the im2col formulation of convolution.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

BN_EPS = 1e-5


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling along one axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def im2col(x: np.ndarray, R: int, S: int, stride: int, padding: int) -> np.ndarray:
    """Gather every R x S input patch a convolution reads.

    x: (N, C, H, W) -> (N, C, R, S, P, Q), a strided view of the padded
    input when possible (no copy); column (c, r, s) at output position (p, q)
    is x_padded[n, c, p*stride + r, q*stride + s].
    """
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    N, C, H, W = x.shape
    P = conv_output_size(H, R, stride, 0)
    Q = conv_output_size(W, S, stride, 0)
    sN, sC, sH, sW = x.strides
    return as_strided(
        x,
        shape=(N, C, R, S, P, Q),
        strides=(sN, sC, sH, sW, sH * stride, sW * stride),
        writeable=False,
    )


def conv2d(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
) -> np.ndarray:
    """2-D cross-correlation, as ``torch.nn.functional.conv2d`` (dilation 1).

    x: (N, C, H, W); weight: (K, C/G, R, S); bias: (K,) or None.
    Returns (N, K, P, Q) with P = floor((H + 2*padding - R) / stride) + 1, Q likewise.

    One matrix product per image and group: weight (G, K/G, C/G*R*S) times the
    patch matrix (N, G, C/G*R*S, P*Q).
    """
    N, C, H, W = x.shape
    K, C_per_group, R, S = weight.shape
    if C != C_per_group * groups or K % groups:
        raise ValueError(
            f"conv2d: input has {C} channels and weight {tuple(weight.shape)} with groups={groups}; "
            f"expected input channels = weight.shape[1] * groups = {C_per_group * groups}"
        )
    P = conv_output_size(H, R, stride, padding)
    Q = conv_output_size(W, S, stride, padding)
    if P < 1 or Q < 1:
        raise ValueError(f"conv2d: input {H}x{W} is too small for a {R}x{S} kernel with padding {padding}")
    G = groups
    if R == 1 and S == 1 and padding == 0:
        # A 1x1 convolution reads each pixel once: the (strided) input is already the patch matrix.
        patches = x[:, :, ::stride, ::stride] if stride > 1 else x
        cols = np.ascontiguousarray(patches).reshape(N, G, C_per_group, P * Q)
    else:
        cols = im2col(x, R, S, stride, padding).reshape(N, G, C_per_group * R * S, P * Q)
    w = weight.reshape(G, K // G, C_per_group * R * S)
    out = np.matmul(w, cols)  # (N, G, K/G, P*Q)
    out = out.reshape(N, K, P, Q)
    if bias is not None:
        out += bias.reshape(1, K, 1, 1)
    return out


def batch_norm(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    eps: float = BN_EPS,
) -> np.ndarray:
    """Batch norm in inference mode: (x - mean) / sqrt(var + eps) * weight + bias, per channel.

    x: (N, C, H, W); the four parameters: (C,). Returns (N, C, H, W).
    """
    shape = (1, -1, 1, 1)
    inv_std = 1.0 / np.sqrt(running_var + eps)
    return (x - running_mean.reshape(shape)) * (inv_std * weight).reshape(shape) + bias.reshape(shape)


def fold_batch_norm(
    weight: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    bn_weight: np.ndarray,
    bn_bias: np.ndarray,
    eps: float = BN_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an inference-mode batch norm into the convolution before it.

    batch_norm(conv2d(x, weight)) == conv2d(x, weight * scale) + (bn_bias - running_mean * scale)
    with scale = bn_weight / sqrt(running_var + eps), per output channel.
    weight: (K, C/G, R, S); the rest (K,). Returns (folded weight, bias) in float64,
    so that the caller rounds once, to the dtype it runs in.
    """
    scale = bn_weight.astype(np.float64) / np.sqrt(running_var.astype(np.float64) + eps)
    folded_weight = weight.astype(np.float64) * scale.reshape(-1, 1, 1, 1)
    folded_bias = bn_bias.astype(np.float64) - running_mean.astype(np.float64) * scale
    return folded_weight, folded_bias


def relu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """max(x, 0) elementwise; NaN stays NaN, as in torch. Pass out=x to work in place."""
    return np.maximum(x, 0, out=out)


def max_pool2d(x: np.ndarray, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> np.ndarray:
    """Max pooling, as ``torch.nn.functional.max_pool2d`` (floor mode).

    x: (N, C, H, W) -> (N, C, P, Q), P = floor((H + 2*padding - kernel_size) / stride) + 1.
    The padding is -inf so that it never wins the max, as in torch.
    """
    if padding > kernel_size // 2:
        raise ValueError("max_pool2d: padding must be at most half the kernel size (as in torch)")
    N, C, H, W = x.shape
    P = conv_output_size(H, kernel_size, stride, padding)
    Q = conv_output_size(W, kernel_size, stride, padding)
    if P < 1 or Q < 1:
        raise ValueError(f"max_pool2d: input {H}x{W} is too small for a {kernel_size}x{kernel_size} window")
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=-np.inf)
    out = None
    for r in range(kernel_size):
        for s in range(kernel_size):
            window = padded[:, :, r : r + stride * (P - 1) + 1 : stride, s : s + stride * (Q - 1) + 1 : stride]
            out = window.copy() if out is None else np.maximum(out, window, out=out)
    return out


def adaptive_avg_pool2d(x: np.ndarray, output_size: int | tuple[int, int] = 1) -> np.ndarray:
    """Adaptive average pooling, as ``torch.nn.functional.adaptive_avg_pool2d``.

    x: (N, C, H, W) -> (N, C, P, Q) with (P, Q) = output_size. Output cell i
    averages input rows floor(i*H/P) to ceil((i+1)*H/P) - 1, and columns likewise.
    """
    P, Q = (output_size, output_size) if isinstance(output_size, int) else output_size
    N, C, H, W = x.shape
    if (P, Q) == (1, 1):
        return x.mean(axis=(2, 3), keepdims=True)
    out = np.empty((N, C, P, Q), dtype=x.dtype)
    for i in range(P):
        h0, h1 = (i * H) // P, math.ceil((i + 1) * H / P)
        for j in range(Q):
            w0, w1 = (j * W) // Q, math.ceil((j + 1) * W / Q)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x @ weight.T + bias, as ``torch.nn.functional.linear``.

    x: (N, C); weight: (K, C); bias: (K,) or None. Returns (N, K).
    """
    out = x @ weight.T
    if bias is not None:
        out += bias
    return out


def quantize_linear(x: np.ndarray, scale, zero_point, axis: int = 1) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round(x / scale) + zero_point), in zero_point's integer dtype.

    round is half to even (np.rint), saturate clips to the dtype's range (int8 [-128, 127],
    uint8 [0, 255], int32). scale and zero_point are scalars (per tensor) or (x.shape[axis],)
    (per axis, e.g. axis=0 for a conv weight's output channels). x / scale is computed in
    x's dtype, as the ONNX reference computes it. Returns an array of x's shape.
    """
    zero_point = np.asarray(zero_point)
    info = np.iinfo(zero_point.dtype)
    scale, zero_point = _per_axis(np.asarray(scale), x.ndim, axis), _per_axis(zero_point, x.ndim, axis)
    q = np.rint(x / scale.astype(x.dtype)) + zero_point
    return np.clip(q, info.min, info.max).astype(zero_point.dtype)


def dequantize_linear(q: np.ndarray, scale, zero_point, axis: int = 1) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale, in scale's dtype (float32 in ONNX)."""
    scale = np.asarray(scale)
    scale, zero_point = _per_axis(scale, q.ndim, axis), _per_axis(np.asarray(zero_point), q.ndim, axis)
    return (q.astype(scale.dtype) - zero_point.astype(scale.dtype)) * scale


def _per_axis(value: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A per-tensor scalar as it is; a per-axis (C,) vector shaped to broadcast along `axis`."""
    if value.ndim == 0:
        return value
    shape = [1] * ndim
    shape[axis] = -1
    return value.reshape(shape)
