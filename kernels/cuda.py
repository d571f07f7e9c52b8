"""numba.cuda kernels for the whole ResNet forward pass (backend "cuda").

Kernels, each checked against the NumPy reference ops of ``npresnet/functional.py``:

    conv2d_naive_kernel   reference variant: one thread per output, reads global memory
                          directly; kept as the spec the tiled kernel is compared with
    conv2d_tiled_kernel   the backend's convolution: an implicit GEMM (no im2col on the host)
                          tiled in shared memory, a TM x TN register micro-tile per thread,
                          grouped convolutions on grid axis z, and the folded batch norm bias,
                          residual add and ReLU fused in the epilogue
    max_pool_kernel       3x3 stride-2 padding-1 max pool (padding never wins; NaN propagates)
    global_avg_pool_kernel  (N, C, H, W) -> (N, C)
    (linear)              the fully connected layer runs as a 1x1 convolution over (N, C, 1, 1)

Activations stay on the device in NCHW between ``from_numpy`` (one host-to-device copy)
and ``to_numpy`` (one device-to-host copy). Folded weights are uploaded once, in
``prepare_conv``, transposed to (G, C/G*R*S, K/G): the GEMM's reduction axis first, so that a
tile load reads consecutive addresses along the output channels. float32 and float64 each get
their own compiled kernels: shared and local arrays take the dtype of the model, and literals are
cast to it (a bare ``0.0`` would be float64 inside a float32 kernel).

The module registers backend "cuda" when ``numba.cuda`` imports (the ``numba-cuda`` package:
``pip install 'npresnet[cuda]'``); building the backend raises ``BackendUnavailable`` where no
GPU is visible and the simulator is off.

Tests: ``python -m pytest tests/cuda`` on a machine with an NVIDIA GPU, or
``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda`` anywhere (numba's CUDA simulator, one
Python thread per CUDA thread, so tiny shapes); the main suite runs the latter through
``tests/test_cuda.py``, which also compiles every kernel to PTX where NVIDIA's compiler works
(no GPU needed) and checks that the float32 kernels do no float64 arithmetic.

References: NVIDIA CUTLASS "Implicit GEMM Convolution" (docs/implicit_gemm_convolution.md);
numba's ``cuda/tests/doc_examples/test_matmul.py`` (naive, then shared-memory tiles);
V. Volkov & J. Demmel, "Benchmarking GPUs to tune dense linear algebra" (register blocking).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from npresnet.backends import Backend, BackendUnavailable, FoldedConv, register_backend
from npresnet.functional import conv_output_size

from . import scipy_hidden_from_numba

with scipy_hidden_from_numba():
    import numba
    from numba import cuda  # ImportError without numba-cuda: the backend is then unavailable


# --- tile shapes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiling:
    """A block of TY x TX threads computes a BM x BN output tile, BM = TY*TM channels by BN = TX*TN positions.

    BK is the depth of the reduction slice held in shared memory between two barriers.
    """

    TY: int
    TX: int
    TM: int
    TN: int
    BK: int

    @property
    def BM(self) -> int:
        return self.TY * self.TM

    @property
    def BN(self) -> int:
        return self.TX * self.TN


# Square tiles for the early, wide maps; a column of channels for a single position (the fc layer
# and the deep layers of a batch of one small image), where any wider tile would sit idle; flat
# tiles for ResNeXt's groups with 4 to 8 output channels each. 64 threads a block throughout:
# enough to fill a warp pair on a GPU, few enough for the simulator.
SQUARE = Tiling(TY=8, TX=8, TM=4, TN=4, BK=16)
COLUMN = Tiling(TY=64, TX=1, TM=2, TN=1, BK=16)
FLAT = Tiling(TY=2, TX=32, TM=4, TN=2, BK=16)
TILINGS = {"square": SQUARE, "column": COLUMN, "flat": FLAT}


def choose_tiling(channels_per_group: int, positions: int) -> Tiling:
    """The tile shape for a GEMM of (K/G output channels) x (N*P*Q positions)."""
    if positions <= COLUMN.BN:
        return COLUMN
    if channels_per_group <= FLAT.BM:
        return FLAT
    return SQUARE


# --- kernels -------------------------------------------------------------------------------


@cuda.jit
def conv2d_naive_kernel(x, weight, bias, residual, out, stride, padding, relu, has_residual):
    """Reference variant: out[n, k, p, q] for one (n, k, p, q) per thread, straight from global memory.

    x (N, C, H, W); weight (K, C/G, R, S), untransposed; bias (K,); residual and out (N, K, P, Q).
    Grid: enough threads on axis x to cover N*K*P*Q.
    """
    N, K, P, Q = out.shape
    C_per_group, R, S = weight.shape[1], weight.shape[2], weight.shape[3]
    H, W = x.shape[2], x.shape[3]
    K_per_group = K // (x.shape[1] // C_per_group)
    i = cuda.grid(1)
    if i >= N * K * P * Q:
        return
    q = i % Q
    p = (i // Q) % P
    k = (i // (P * Q)) % K
    n = i // (K * P * Q)
    c0 = (k // K_per_group) * C_per_group
    acc = bias[k]
    for c in range(C_per_group):
        for r in range(R):
            h = p * stride - padding + r
            if h < 0 or h >= H:
                continue
            for s in range(S):
                w = q * stride - padding + s
                if 0 <= w < W:
                    acc += weight[k, c, r, s] * x[n, c0 + c, h, w]
    if has_residual:
        acc += residual[n, k, p, q]
    # Two stores rather than `acc = 0`, which would retype acc (and the whole sum) as float64.
    if relu and acc < 0:
        out[n, k, p, q] = 0
    else:
        out[n, k, p, q] = acc  # NaN is not < 0: it stays NaN, as in torch


@functools.lru_cache(maxsize=None)
def conv2d_tiled_kernel(dtype: np.dtype, tiling: Tiling):
    """The implicit-GEMM convolution kernel compiled for `dtype` and `tiling`.

    Per group g (grid axis z) it computes the GEMM
        out[n, g*K/G + m, p, q] = sum_kk weight_t[g, kk, m] * patch[kk, (n, p, q)]
    with kk = (c, r, s) over C/G*R*S and patch[kk, (n, p, q)] = x[n, g*C/G + c, p*stride - padding + r,
    q*stride - padding + s] (zero outside the input), gathered straight into shared memory.
    Arguments: x (N, C, H, W); weight_t (G, C/G*R*S, K/G); bias (K,); residual and out (N, K, P, Q);
    stride, padding, R, S; relu and has_residual as 0/1. Grid: (ceil(N*P*Q/BN), ceil(K/G/BM), G).
    """
    t = tiling
    TY, TX, TM, TN, BK, BM, BN = t.TY, t.TX, t.TM, t.TN, t.BK, t.BM, t.BN
    THREADS = TY * TX
    real = numba.from_dtype(np.dtype(dtype))

    @cuda.jit
    def kernel(x, weight_t, bias, residual, out, stride, padding, R, S, relu, has_residual):
        N, C, H, W = x.shape
        K, P, Q = out.shape[1], out.shape[2], out.shape[3]
        G = weight_t.shape[0]
        C_per_group, K_per_group = C // G, K // G
        RS = R * S
        depth = C_per_group * RS  # the GEMM's reduction length
        positions = N * P * Q

        g = cuda.blockIdx.z
        m0 = cuda.blockIdx.y * BM  # first output channel (within the group) of this tile
        j0 = cuda.blockIdx.x * BN  # first output position of this tile
        ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
        tid = ty * TX + tx

        tile_w = cuda.shared.array((BK, BM), real)
        tile_x = cuda.shared.array((BK, BN), real)
        acc = cuda.local.array((TM, TN), real)
        a = cuda.local.array(TM, real)
        b = cuda.local.array(TN, real)
        zero = real(0)
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = zero
        # This thread owns channels m0 + ty + i*TY and positions j0 + tx + j*TX; a thread whose
        # outputs all fall outside the GEMM still loads tiles but skips the products.
        active = m0 + ty < K_per_group and j0 + tx < positions

        for kk0 in range(0, depth, BK):
            # Load: a BK x BM slice of the weights and the matching BK x BN slice of patches.
            for e in range(tid, BK * BM, THREADS):
                kk, m = kk0 + e // BM, m0 + e % BM
                tile_w[e // BM, e % BM] = weight_t[g, kk, m] if kk < depth and m < K_per_group else zero
            for e in range(tid, BK * BN, THREADS):
                kk, j = kk0 + e // BN, j0 + e % BN
                v = zero
                if kk < depth and j < positions:
                    c, rs = kk // RS, kk % RS
                    n, pq = j // (P * Q), j % (P * Q)
                    h = (pq // Q) * stride - padding + rs // S
                    w = (pq % Q) * stride - padding + rs % S
                    if 0 <= h < H and 0 <= w < W:
                        v = x[n, g * C_per_group + c, h, w]
                tile_x[e // BN, e % BN] = v
            cuda.syncthreads()
            # Partial products: an outer product per reduction step, in registers.
            if active:
                for kk in range(BK):
                    for i in range(TM):
                        a[i] = tile_w[kk, ty + i * TY]
                    for j in range(TN):
                        b[j] = tile_x[kk, tx + j * TX]
                    for i in range(TM):
                        for j in range(TN):
                            acc[i, j] += a[i] * b[j]
            cuda.syncthreads()

        # Epilogue: folded batch norm bias, residual, ReLU, one write per output.
        for i in range(TM):
            m = m0 + ty + i * TY
            if m >= K_per_group:
                continue
            k = g * K_per_group + m
            for j in range(TN):
                col = j0 + tx + j * TX
                if col >= positions:
                    continue
                n, pq = col // (P * Q), col % (P * Q)
                p, q = pq // Q, pq % Q
                v = acc[i, j] + bias[k]
                if has_residual:
                    v += residual[n, k, p, q]
                if relu and v < zero:
                    v = zero
                out[n, k, p, q] = v

    return kernel


@cuda.jit
def max_pool_kernel(x, out, kernel_size, stride, padding):
    """out[n, c, p, q] = max of x over the window at (p*stride - padding, q*stride - padding), in bounds.

    Starting from an element inside the window (never from a -inf literal) keeps the dtype and
    makes padding lose by construction. NaN propagates as in torch. Grid: N*C*P*Q threads on x.
    """
    N, C, P, Q = out.shape
    H, W = x.shape[2], x.shape[3]
    i = cuda.grid(1)
    if i >= N * C * P * Q:
        return
    q = i % Q
    p = (i // Q) % P
    c = (i // (P * Q)) % C
    n = i // (C * P * Q)
    h0, w0 = p * stride - padding, q * stride - padding
    best = x[n, c, max(h0, 0), max(w0, 0)]
    for h in range(max(h0, 0), min(h0 + kernel_size, H)):
        for w in range(max(w0, 0), min(w0 + kernel_size, W)):
            v = x[n, c, h, w]
            if v > best or v != v:
                best = v
    out[n, c, p, q] = best


@functools.lru_cache(maxsize=None)
def global_avg_pool_kernel(dtype: np.dtype):
    """out[n, c] = mean of x[n, c] over H x W, for `dtype`. Grid: N*C threads on x."""
    real = numba.from_dtype(np.dtype(dtype))

    @cuda.jit
    def kernel(x, out):
        N, C, H, W = x.shape
        i = cuda.grid(1)
        if i >= N * C:
            return
        n, c = i // C, i % C
        acc = real(0)
        for h in range(H):
            for w in range(W):
                acc += x[n, c, h, w]
        # Divide in the array's dtype: acc / (H * W) would promote a float32 sum to float64.
        out[n, c] = acc / real(H * W)

    return kernel


# --- the backend ---------------------------------------------------------------------------

THREADS_1D = 128


def _blocks(count: int, threads: int = THREADS_1D) -> int:
    return max(1, math.ceil(count / threads))


@dataclass(frozen=True)
class DeviceConv:
    """A folded convolution on the device: weight_t (G, C/G*R*S, K/G) and bias (K,)."""

    weight_t: object
    bias: object
    out_channels: int
    kernel_size: tuple[int, int]
    stride: int
    padding: int
    groups: int
    dtype: np.dtype


def upload_conv(conv: FoldedConv) -> DeviceConv:
    """Transpose a folded convolution's weight to the tiled kernel's layout and copy it to the device."""
    K, C_per_group, R, S = conv.weight.shape
    G = conv.groups
    weight_t = conv.weight.reshape(G, K // G, C_per_group * R * S).transpose(0, 2, 1)
    return DeviceConv(
        weight_t=cuda.to_device(np.ascontiguousarray(weight_t)),
        bias=cuda.to_device(np.ascontiguousarray(conv.bias)),
        out_channels=K,
        kernel_size=(R, S),
        stride=conv.stride,
        padding=conv.padding,
        groups=G,
        dtype=conv.weight.dtype,
    )


def conv2d(x, conv: DeviceConv, relu: bool = False, residual=None, tiling: Tiling | None = None):
    """The tiled convolution on device arrays: x (N, C, H, W) -> (N, K, P, Q), epilogue fused.

    P = floor((H + 2*padding - R) / stride) + 1, Q likewise; residual (N, K, P, Q) or None.
    tiling: a tile shape from TILINGS, else the one choose_tiling picks for this GEMM.
    """
    N, C, H, W = x.shape
    R, S = conv.kernel_size
    P = conv_output_size(H, R, conv.stride, conv.padding)
    Q = conv_output_size(W, S, conv.stride, conv.padding)
    if P < 1 or Q < 1:
        raise ValueError(f"conv2d: input {H}x{W} is too small for a {R}x{S} kernel with padding {conv.padding}")
    if C != conv.weight_t.shape[1] // (R * S) * conv.groups:
        raise ValueError(f"conv2d: input has {C} channels, the convolution expects {conv.weight_t.shape[1] // (R * S) * conv.groups}")
    if x.dtype != conv.dtype:
        raise TypeError(f"conv2d: input dtype {x.dtype} != weight dtype {conv.dtype}")
    out = cuda.device_array((N, conv.out_channels, P, Q), dtype=conv.dtype)
    tiling = tiling or choose_tiling(conv.out_channels // conv.groups, N * P * Q)
    grid = (
        math.ceil(N * P * Q / tiling.BN),
        math.ceil(conv.out_channels // conv.groups / tiling.BM),
        conv.groups,
    )
    kernel = conv2d_tiled_kernel(np.dtype(conv.dtype), tiling)
    kernel[grid, (tiling.TX, tiling.TY)](
        x,
        conv.weight_t,
        conv.bias,
        out if residual is None else residual,  # never read when has_residual is 0
        out,
        conv.stride,
        conv.padding,
        R,
        S,
        int(relu),
        int(residual is not None),
    )
    return out


def max_pool2d(x, kernel_size: int = 3, stride: int = 2, padding: int = 1):
    """Max pool on device arrays: (N, C, H, W) -> (N, C, P, Q), P = floor((H + 2p - k) / s) + 1."""
    N, C, H, W = x.shape
    P = conv_output_size(H, kernel_size, stride, padding)
    Q = conv_output_size(W, kernel_size, stride, padding)
    if P < 1 or Q < 1:
        raise ValueError(f"max_pool2d: input {H}x{W} is too small for a {kernel_size}x{kernel_size} window")
    out = cuda.device_array((N, C, P, Q), dtype=x.dtype)
    max_pool_kernel[_blocks(out.size), THREADS_1D](x, out, kernel_size, stride, padding)
    return out


def global_avg_pool(x):
    """Mean over positions on device arrays: (N, C, H, W) -> (N, C)."""
    N, C = x.shape[:2]
    out = cuda.device_array((N, C), dtype=x.dtype)
    global_avg_pool_kernel(np.dtype(x.dtype))[_blocks(N * C), THREADS_1D](x, out)
    return out


class CudaBackend(Backend):
    """Every op of the forward pass on one NVIDIA GPU, through numba.cuda; activations NCHW in device memory."""

    name = "cuda"

    def __init__(self, threads: int | None = None):
        if not cuda.is_available():
            raise BackendUnavailable(
                "backend 'cuda' is not available: numba.cuda finds no usable NVIDIA GPU and driver here "
                "(install one, or set NUMBA_ENABLE_CUDASIM=1 before numba is imported to run the slow simulator)"
            )
        self.threads = threads  # CPU threads do not apply; kept for the common factory signature

    def prepare_conv(self, conv: FoldedConv) -> DeviceConv:
        return upload_conv(conv)

    def prepare_linear(self, weight, bias) -> DeviceConv:
        # fc is a 1x1 convolution over the pooled (N, C, 1, 1) map: the tiled kernel serves both.
        K, C = weight.shape
        return upload_conv(FoldedConv(weight.reshape(K, C, 1, 1), bias, stride=1, padding=0, groups=1))

    def from_numpy(self, x):
        return cuda.to_device(np.ascontiguousarray(x))

    def to_numpy(self, x):
        return x.copy_to_host()

    def conv(self, x, conv: DeviceConv, relu, residual=None):
        return conv2d(x, conv, relu=relu, residual=residual)

    def max_pool(self, x):
        return max_pool2d(x, kernel_size=3, stride=2, padding=1)

    def global_avg_pool(self, x):
        return global_avg_pool(x)

    def linear(self, x, fc: DeviceConv):
        N, C = x.shape
        out = conv2d(x.reshape(N, C, 1, 1), fc)  # (N, K, 1, 1)
        return out.reshape(N, fc.out_channels)


register_backend("cuda", CudaBackend)
