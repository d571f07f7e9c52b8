"""Numba CPU kernels: the "numba" backend (NHWC activations, fused epilogues, Winograd 3x3).

Importing this module registers the backend with ``npresnet.backends``; it raises
ImportError where numba is missing, so ``backend="auto"`` falls back to NumPy.
Importing it changes nothing else in the process. Creating the first ``NumbaBackend``
does, once (``_process_setup``): it sets numba's threading layer to "workqueue" (unless
$NUMBA_THREADING_LAYER says otherwise; numba's OpenMP layer spins at its barriers, which
stalls whole forward passes when the cores are shared: bench/results/notes.md), hands the
kernels below to numba (each is compiled, or loaded from the kernel cache, at its first call),
and finds the OpenBLAS that NumPy loaded, to run it single-threaded inside each convolution.

Variants, chosen on each call in ``NumbaBackend.conv``, one method each:
    winograd  3x3, stride 1, padding 1, groups 1: Winograd F(m x m, 3x3), m = 4 or 2
              (float32 and float64; chosen per call from the number of tiles, see
              NumbaBackend._winograd_tile): input transform -> one GEMM per tile
              element -> output transform with bias, residual and ReLU fused, so
              each output activation is written once.
    1x1       1x1 convolutions (stride 1 or 2, groups 1): the NHWC activation is
              already the GEMM's left matrix; bias/residual/ReLU fused after the GEMM.
    im2col    everything else (the 7x7 stem, stride-2 3x3, ResNeXt's grouped 3x3, 3x3 on
              maps too small for Winograd): NHWC patches gathered, one GEMM per
              group, fused epilogue.
    The 1x1 and im2col paths hand each thread one share of the output rows (or, where
    the weights outweigh the patches, of the output channels) and let it gather,
    multiply and finish its share alone: one thread synchronisation per layer.

The GEMMs run in NumPy's BLAS (numba's own np.dot would need SciPy), set to
one thread for the duration of each convolution. A small thread pool (BLAS and
the nogil Numba kernels release the GIL) hands each thread one share of the
layer, which it gathers or transforms, multiplies and finishes alone: one thread
synchronisation per convolution (each costs a thread wake-up: bench/results/notes.md),
and OpenBLAS's own threads (which spin after each call) stay idle. Max pooling is split the same way: no
kernel is a parallel Numba loop, whose threading layer and parfor compilation cost seconds of start-up.

Numerics: no fastmath (NaN and inf behave as in the reference); the Winograd
weight transform is done in float64 and rounded once. Measured against the
float64 reference: see bench/ and tests/test_kernels_cpu.py.

Compiled kernels are cached on disk (``cache=True``) under
``npresnet.backends.kernel_cache_dir()`` ($NUMBA_CACHE_DIR when the user set it, else
$NPRESNET_HOME/numba, else ~/.cache/npresnet/numba), so a read-only
site-packages still gets a cache and a second process does not recompile.
Numba fixes a function's cache directory when it is decorated, so the kernels
are decorated (``njit``) in ``_process_setup``, not at import. Each kernel is compiled (or
loaded from the cache) at its first call, for the types of that call only; the first compile in a
process says so on stderr (the "npresnet" logger), so a first run does not look like a hang.

References: Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks"
(2015) for the Winograd matrices; CS231n ``fast_layers.py`` for im2col.
Tests: ``python -m pytest -q tests/test_kernels_cpu.py``; speed: ``python bench/run.py``.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numba  # ImportError here keeps the backend unregistered: the point of this module
import numpy as np
from numba import njit
from numba.core import event

from npresnet.backends import Backend, FoldedConv, kernel_cache_dir, register_backend
from npresnet.functional import conv_output_size

# The kernels, as Python functions: name -> (function, njit options). _process_setup compiles them.
_KERNELS: dict[str, tuple] = {}


def kernel(**options):
    """Mark a function as a Numba kernel (njit with `options`, cached on disk), compiled by _process_setup."""

    def mark(py_func):
        _KERNELS[py_func.__name__] = (py_func, options)
        return py_func

    return mark


@contextlib.contextmanager
def _our_cache_dir():
    """Point numba's cache at npresnet's directory while our kernels are decorated.

    Numba picks a function's cache location when it is decorated, so this leaves
    every other numba user in the process (and a user-set NUMBA_CACHE_DIR) alone.
    """
    if numba.config.CACHE_DIR:
        yield
        return
    numba.config.CACHE_DIR = kernel_cache_dir()
    try:
        yield
    finally:
        numba.config.CACHE_DIR = ""


@kernel(nogil=True)
def im2col(x, R, S, stride, padding, P, Q, job_lo, job_hi, cols):
    """Output rows job_lo <= (n, p) < job_hi of x (N, H, W, C) -> cols (G, (job_hi-job_lo)*Q, R*S*C/G).

    Column order (r, s, c), zero padded. Serial and GIL-free: each thread of the
    backend's pool gathers its own chunk just before multiplying it.
    """
    N, H, W, C = x.shape
    G = cols.shape[0]
    Cg = C // G
    flat = x.reshape(-1)
    for job in range(job_lo, job_hi):
        n = job // P
        p = job % P
        for q in range(Q):
            row = (job - job_lo) * Q + q
            dst = cols[0, row]
            w0 = q * stride - padding
            # Kernel columns s_lo <= s < s_hi fall inside the image.
            s_lo = max(0, -w0)
            s_hi = min(S, W - w0)
            for r in range(R):
                h = p * stride + r - padding
                inside = 0 <= h < H
                for g in range(G):
                    base = r * S * Cg
                    if not inside:
                        for i in range(S * Cg):
                            cols[g, row, base + i] = 0
                        continue
                    for i in range(s_lo * Cg):
                        cols[g, row, base + i] = 0
                    if G == 1:
                        # One contiguous run: x[n, h, w0 + s_lo : w0 + s_hi, :] in NHWC.
                        src = ((n * H + h) * W + w0 + s_lo) * C
                        start = base + s_lo * C
                        for i in range((s_hi - s_lo) * C):
                            dst[start + i] = flat[src + i]
                    else:
                        for s in range(s_lo, s_hi):
                            for c in range(Cg):
                                cols[g, row, base + s * Cg + c] = x[n, h, w0 + s, g * Cg + c]
                    for i in range(max(s_hi, s_lo) * Cg, S * Cg):
                        cols[g, row, base + i] = 0

@kernel(nogil=True)
def epilogue(src, bias, residual, has_residual, relu, out):
    """out (M, K) = [relu](src + bias [+ residual]); src (G, M, K/G) may be out itself when G == 1.

    Serial and GIL-free, called by each pool thread on the chunk it just multiplied (still in cache).
    """
    G, M, Kg = src.shape
    for row in range(M):
        for g in range(G):
            for kk in range(Kg):
                k = g * Kg + kk
                v = src[g, row, kk] + bias[k]
                if has_residual:
                    v += residual[row, k]
                if relu and v < 0:  # written so that NaN stays NaN, as np.maximum(x, 0)
                    v = 0
                out[row, k] = v

@kernel(nogil=True)
def winograd_input(x, BT, m, t_lo, t_hi, V):
    """x (N, H, W, C) -> V (A*A, G, t_hi-t_lo, C/G) = B^T d B for tiles t_lo <= t < t_hi.

    A = m + 2; tiles in row-major (n, tile row, tile column) order; the patch of
    tile (i, j) is the A x A patch d at (i*m - 1, j*m - 1) (padding 1), zeros outside x.
    Serial and GIL-free: each pool thread transforms its own share of the tiles.
    """
    N, H, W, C = x.shape
    A = BT.shape[0]
    G = V.shape[1]
    Cg = C // G
    th = (H + m - 1) // m
    tw = (W + m - 1) // m
    d = np.empty((A, A, C), dtype=x.dtype)
    tmp = np.empty((A, A, C), dtype=x.dtype)
    acc = np.empty(C, dtype=x.dtype)
    for t in range(t_lo, t_hi):
        n = t // (th * tw)
        i = (t // tw) % th
        j = t % tw
        for a in range(A):
            h = i * m + a - 1
            for b in range(A):
                w = j * m + b - 1
                if 0 <= h < H and 0 <= w < W:
                    for c in range(C):
                        d[a, b, c] = x[n, h, w, c]
                else:
                    for c in range(C):
                        d[a, b, c] = 0
        # tmp = B^T d (rows), then V = tmp B (columns); zero coefficients skipped.
        for a in range(A):
            for b in range(A):
                for c in range(C):
                    tmp[a, b, c] = 0
                for k in range(A):
                    coef = BT[a, k]
                    if coef != 0:
                        for c in range(C):
                            tmp[a, b, c] += coef * d[k, b, c]
        for a in range(A):
            for b in range(A):
                for c in range(C):
                    acc[c] = 0
                for k in range(A):
                    coef = BT[b, k]
                    if coef != 0:
                        for c in range(C):
                            acc[c] += coef * tmp[a, k, c]
                for g in range(G):
                    for c in range(Cg):
                        V[a * A + b, g, t - t_lo, c] = acc[g * Cg + c]

@kernel(nogil=True)
def winograd_output(Mt, AT, bias, residual, has_residual, relu, t_lo, t_hi, out):
    """Mt (A*A, G, t_hi-t_lo, K/G) -> out (N, P, Q, K) = [relu](A^T M A + bias [+ residual]) for
    tiles t_lo <= t < t_hi, clipped at the edge. Serial and GIL-free, as winograd_input."""
    N, P, Q, K = out.shape
    m, A = AT.shape
    G = Mt.shape[1]
    Kg = Mt.shape[3]
    th = (P + m - 1) // m
    tw = (Q + m - 1) // m
    tmp = np.empty((m, A, K), dtype=out.dtype)
    acc = np.empty(K, dtype=out.dtype)
    for t in range(t_lo, t_hi):
        n = t // (th * tw)
        i = (t // tw) % th
        j = t % tw
        for a in range(m):
            for b in range(A):
                for k in range(K):
                    tmp[a, b, k] = 0
                for x in range(A):
                    coef = AT[a, x]
                    if coef != 0:
                        for g in range(G):
                            for kk in range(Kg):
                                tmp[a, b, g * Kg + kk] += coef * Mt[x * A + b, g, t - t_lo, kk]
        for a in range(m):
            p = i * m + a
            if p >= P:
                break
            for b in range(m):
                q = j * m + b
                if q >= Q:
                    break
                for k in range(K):
                    acc[k] = 0
                for y in range(A):
                    coef = AT[b, y]
                    if coef != 0:
                        for k in range(K):
                            acc[k] += coef * tmp[a, y, k]
                for k in range(K):
                    v = acc[k] + bias[k]
                    if has_residual:
                        v += residual[n, p, q, k]
                    if relu and v < 0:
                        v = 0
                    out[n, p, q, k] = v

@kernel(nogil=True)
def max_pool_3x3s2(x, job_lo, job_hi, out):
    """x (N, H, W, C) -> output rows job_lo <= (n, p) < job_hi of out (N, P, Q, C): 3x3 window, stride 2,
    padding 1 (never wins), NaN propagates. Serial and GIL-free: each pool thread pools its own rows
    (a parallel numba loop would load numba's threading layer and compile parfors: seconds of start-up)."""
    N, H, W, C = x.shape
    _, P, Q, _ = out.shape
    for job in range(job_lo, job_hi):
        n = job // P
        p = job % P
        for q in range(Q):
            for c in range(C):
                out[n, p, q, c] = -np.inf
            for r in range(3):
                h = 2 * p + r - 1
                if h < 0 or h >= H:
                    continue
                for s in range(3):
                    w = 2 * q + s - 1
                    if w < 0 or w >= W:
                        continue
                    for c in range(C):
                        v = x[n, h, w, c]
                        if v > out[n, p, q, c] or v != v:
                            out[n, p, q, c] = v


# Winograd F(m x m, 3 x 3) matrices (Lavin & Gray 2015): B^T (A x A), G (A x 3), A^T (m x A), A = m + 2.
WINOGRAD = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64),
    ),
    4: (
        np.array(
            [
                [4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1],
            ],
            dtype=np.float64,
        ),
        np.array(
            [
                [1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1],
            ],
            dtype=np.float64,
        ),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=np.float64),
    ),
}


def _winograd_matrices(tile: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    BT, Gm, AT = WINOGRAD[tile]
    return BT.astype(dtype), Gm.astype(dtype), AT.astype(dtype)


class PreparedConv:
    """A folded convolution in the forms its kernels want (see the module docstring for the variants).

    W (G, R*S*C/G, K/G) for the GEMM paths; for 3x3 stride-1 convolutions the
    Winograd weights U (A*A, G, C/G, K/G) of each tile size, made on first use.
    """

    def __init__(self, conv: FoldedConv):
        K, Cg, R, S = conv.weight.shape
        G = conv.groups
        self.K, self.Cg, self.R, self.S, self.G = K, Cg, R, S, G
        self.stride, self.padding = conv.stride, conv.padding
        self.dtype = conv.weight.dtype
        self.bias = np.ascontiguousarray(conv.bias)
        w = conv.weight.reshape(G, K // G, Cg, R, S).transpose(0, 3, 4, 2, 1)  # (G, R, S, C/G, K/G)
        self.W = np.ascontiguousarray(w.reshape(G, R * S * Cg, K // G))
        self.winograd = (R, S, conv.stride, conv.padding, G) == (3, 3, 1, 1, 1)
        self._U: dict[int, np.ndarray] = {}

    def U(self, tile: int) -> np.ndarray:
        if tile not in self._U:
            _, Gm, _ = WINOGRAD[tile]
            A = tile + 2
            X = self.G * self.Cg * (self.K // self.G)
            g = self.W.reshape(self.G, 3, 3, -1).transpose(1, 2, 0, 3).astype(np.float64).reshape(3, 3, X)  # (R, S, X)
            # U = G g G^T for every (group, input, output) channel triple, in float64 and rounded once.
            rows = np.matmul(Gm, g.reshape(3, 3 * X)).reshape(A, 3, X)  # (A, S, X)
            U = np.matmul(Gm, rows)  # (A, A, X)
            self._U[tile] = U.reshape(A * A, self.G, self.Cg, self.K // self.G).astype(self.dtype)
        return self._U[tile]


class NumbaBackend(Backend):
    """Numba kernels over NHWC activations, BLAS for the GEMMs; see the module docstring."""

    name = "numba"
    # Not thread-safe: the workqueue threading layer aborts the process when two threads enter its
    # parallel loops at once, and each convolution sets OpenBLAS's process-wide thread count.
    thread_safe = False
    # Winograd only with at least this many tiles per call (see _winograd_tile).
    MIN_TILES = 32
    # Rows of the GEMM paths are gathered, multiplied and finished in chunks of at least this many
    # bytes of patches (or outputs), which bounds the patch workspace at large batches; smaller
    # chunks make small, slow GEMMs (bench/results/notes.md).
    CHUNK_BYTES = 1 << 20

    def __init__(self, threads: int | None = None, winograd_tile: int = 4):
        self.kernels = _process_setup()
        self.threads = min(threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
        self.winograd_tile = winograd_tile
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None

    # --- threads ---------------------------------------------------------------------------

    def _threads(self):
        numba.set_num_threads(self.threads)  # per calling thread in numba, so set on every op

    def _split(self, work, length):
        """work(lo, hi) over [0, length) cut into one contiguous share per thread; returns when all are done.

        Each share does its whole layer step (gather or transform, single-threaded BLAS,
        epilogue) alone: one thread synchronisation per layer. OpenBLAS splitting each
        GEMM itself meant one per GEMM (36 per Winograd layer), ruinous when the cores
        are shared, and its spinning threads stole cores from the next kernels.
        """
        parts = min(self.threads, length)
        bounds = np.linspace(0, length, parts + 1).astype(int).tolist()
        futures = [self._pool.submit(work, bounds[i], bounds[i + 1]) for i in range(1, parts)]
        work(bounds[0], bounds[1])
        for future in futures:
            future.result()

    # --- layout ----------------------------------------------------------------------------

    def from_numpy(self, x):
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # (N, H, W, C)

    def to_numpy(self, x):
        if x.ndim == 4:
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, C, H, W)
        return np.array(x)

    def prepare_conv(self, conv: FoldedConv) -> PreparedConv:
        return PreparedConv(conv)

    def _winograd_tile(self, conv: PreparedConv, N: int, P: int, Q: int) -> int:
        """The Winograd tile for this call, or 0 for the GEMM path.

        F(4x4) beats im2col from 14x14 maps up; at 7x7 and batch 1 (16 or fewer tiles)
        the transformed weights (4x or 1.8x the plain ones) cost as much as the work
        saved, so the plain GEMM is used there (per-layer timings: bench/results/notes.md).
        """
        if not conv.winograd:
            return 0
        for tile in (4, 2):
            if tile <= self.winograd_tile and N * -(-P // tile) * -(-Q // tile) >= self.MIN_TILES:
                return tile
        return 0

    def prepare_linear(self, weight, bias):
        return np.ascontiguousarray(weight.T), bias

    # --- ops -------------------------------------------------------------------------------

    def _workspace(self, name, shape, dtype):
        """A scratch array reused across calls (per thread): saves page faults on every conv."""
        spaces = self._local.__dict__.setdefault("spaces", {})
        size = int(np.prod(shape))
        key = (name, np.dtype(dtype))
        buf = spaces.get(key)
        if buf is None or buf.size < size:
            buf = spaces[key] = np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)

    def conv(self, x, conv: PreparedConv, relu, residual=None):
        N, H, W, C = x.shape
        if C != conv.Cg * conv.G:
            raise ValueError(f"conv: input has {C} channels, the convolution expects {conv.Cg * conv.G}")
        P = conv_output_size(H, conv.R, conv.stride, conv.padding)
        Q = conv_output_size(W, conv.S, conv.stride, conv.padding)
        if P < 1 or Q < 1:
            raise ValueError(f"conv2d: input {H}x{W} is too small for a {conv.R}x{conv.S} kernel with padding {conv.padding}")
        out = np.empty((N, P, Q, conv.K), dtype=x.dtype)  # (N, P, Q, K)
        if residual is not None and residual.shape != out.shape:
            raise ValueError(f"conv: residual shape {residual.shape} != output shape {out.shape}")
        self._threads()
        with _single_threaded_blas():
            tile = self._winograd_tile(conv, N, P, Q)
            if tile:
                self._conv_winograd(x, conv, relu, residual, out, tile)
            elif conv.R == conv.S == 1 and conv.padding == 0 and conv.G == 1:
                self._conv_1x1(x, conv, relu, residual, out)
            else:
                self._conv_im2col(x, conv, relu, residual, out)
        return out

    def _conv_winograd(self, x, conv: PreparedConv, relu, residual, out, m):
        """3x3 stride 1: each thread transforms, multiplies and finishes its own tiles (one synchronisation)."""
        N, P, Q, _ = out.shape
        A = m + 2
        T = N * ((P + m - 1) // m) * ((Q + m - 1) // m)
        BT, _, AT = _winograd_matrices(m, x.dtype)
        U = conv.U(m)
        has_residual = residual is not None
        res = residual if has_residual else out  # a placeholder of the right type when there is none

        def tiles(lo, hi):
            V = self._workspace("V", (A * A, conv.G, hi - lo, conv.Cg), x.dtype)
            self.kernels.winograd_input(x, BT, m, lo, hi, V)
            Mt = self._workspace("M", (A * A, conv.G, hi - lo, conv.K // conv.G), x.dtype)
            np.matmul(V, U, out=Mt)
            self.kernels.winograd_output(Mt, AT, conv.bias, res, has_residual, relu, lo, hi, out)

        self._split(tiles, T)

    def _conv_1x1(self, x, conv: PreparedConv, relu, residual, out):
        """1x1, groups 1: the (strided) NHWC input is already the GEMM's left matrix."""
        a = x if conv.stride == 1 else np.ascontiguousarray(x[:, :: conv.stride, :: conv.stride, :])
        a = a.reshape(1, -1, x.shape[3])  # (1, N*P*Q, C)
        Q = out.shape[2]
        self._gemm(conv, relu, residual, out, lambda j, k: a[:, j * Q : k * Q])

    def _conv_im2col(self, x, conv: PreparedConv, relu, residual, out):
        """Everything else: NHWC patches gathered (per thread, per chunk), then the GEMM."""
        _, P, Q, _ = out.shape
        width = conv.R * conv.S * conv.Cg

        def patches(j, k):
            cols = self._workspace("cols", (conv.G, (k - j) * Q, width), x.dtype)
            self.kernels.im2col(x, conv.R, conv.S, conv.stride, conv.padding, P, Q, j, k, cols)
            return cols

        self._gemm(conv, relu, residual, out, patches)

    def _gemm(self, conv: PreparedConv, relu, residual, out, patches):
        """out = epilogue(patches @ W), where patches(j, k) is the (G, (k-j)*Q, R*S*C/G) patch matrix
        of output rows j <= (n, p) < k. The work is split between threads by output channels where the
        weights outweigh the patches (layer4 at batch 1: each thread then reads only its share of the
        weights), else by output rows, chunk by chunk: gather, multiply, finish while still in cache."""
        N, P, Q, K = out.shape
        M, G, width = N * P * Q, conv.G, conv.R * conv.S * conv.Cg
        has_residual = residual is not None
        out2 = out.reshape(M, K)
        res2 = (residual if has_residual else out).reshape(M, K)
        epilogue = self.kernels.epilogue
        if G == 1 and conv.W.nbytes > M * width * out.itemsize:
            a = patches(0, N * P)[0]  # (M, width), gathered once, read by every thread

            def columns(lo, hi):
                np.matmul(a, conv.W[0, :, lo:hi], out=out2[:, lo:hi])
                epilogue(out2[None, :, lo:hi], conv.bias[lo:hi], res2[:, lo:hi], has_residual, relu, out2[:, lo:hi])

            self._split(columns, K)
            return
        step = max(1, self.CHUNK_BYTES // (Q * max(G * width, K) * out.itemsize))

        def rows(lo, hi):
            for j in range(lo, hi, step):
                k = min(j + step, hi)
                span = slice(j * Q, k * Q)
                cols = patches(j, k)  # (G, (k-j)*Q, width)
                if G == 1:
                    np.matmul(cols[0], conv.W[0], out=out2[span])
                    src = out2[None, span]
                else:
                    src = self._workspace("gemm", (G, (k - j) * Q, K // G), out.dtype)
                    np.matmul(cols, conv.W, out=src)
                epilogue(src, conv.bias, res2[span], has_residual, relu, out2[span])

        self._split(rows, N * P)

    def max_pool(self, x):
        N, H, W, C = x.shape
        out = np.empty((N, conv_output_size(H, 3, 2, 1), conv_output_size(W, 3, 2, 1), C), dtype=x.dtype)
        self._split(lambda lo, hi: self.kernels.max_pool_3x3s2(x, lo, hi, out), N * out.shape[1])
        return out

    def global_avg_pool(self, x):
        return x.mean(axis=(1, 2))  # (N, C)

    def linear(self, x, fc):
        weight_t, bias = fc
        # Single-threaded too: a woken OpenBLAS worker spins on, stealing a core from the next layers.
        with _single_threaded_blas():
            out = x @ weight_t
        out += bias
        return out


# --- BLAS thread count ---------------------------------------------------------------------------


def _find_openblas():
    """(set_num_threads, get_num_threads) of the OpenBLAS NumPy loaded, if any (found as threadpoolctl does)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    return setter, getter
    return None


@functools.lru_cache(maxsize=None)
def _openblas():
    """_find_openblas, once per process (first asked for by _process_setup)."""
    return _find_openblas()


@contextlib.contextmanager
def _single_threaded_blas():
    """BLAS on one thread for the duration (the backend splits GEMMs itself), then as the user had it."""
    if _openblas() is None:
        yield
        return
    setter, getter = _openblas()
    before = getter()
    setter(ctypes.c_int(1))
    try:
        yield
    finally:
        setter(ctypes.c_int(before))


# --- what the first backend sets up ----------------------------------------------------------------


class _CompileNotice(event.Listener):
    """One line on stderr (the "npresnet" logger, which a user can configure or silence) when the first of
    our kernels is compiled in this process, so that a first run's seconds of compiling do not look like a
    hang. Numba announces only real compilations ("numba:compile"), not loads from the kernel cache."""

    def __init__(self, dispatchers):
        self.dispatchers = {id(d) for d in dispatchers}
        self.said = False

    def on_start(self, ev):
        if not self.said and id(ev.data["dispatcher"]) in self.dispatchers:
            self.said = True
            logging.getLogger("npresnet").warning(
                "npresnet: compiling the Numba kernels for this machine (once; a few seconds; cached in %s)",
                numba.config.CACHE_DIR or kernel_cache_dir(),
            )

    def on_end(self, ev):
        pass


@functools.lru_cache(maxsize=None)
def _process_setup() -> SimpleNamespace:
    """The kernels as numba dispatchers, once per process, when the first backend is made. Each kernel is
    compiled, or loaded from the kernel cache, at its first call (for the argument types of that call), so
    a model compiles only the kernels and specialisations it runs; compiling is announced (_CompileNotice).

    Also the process-wide settings the backend needs, made here and not at import: numba's threading
    layer ("workqueue", which sleeps where OpenMP's spins, unless $NUMBA_THREADING_LAYER is set; it takes
    effect if no parallel numba code has run yet), and the OpenBLAS probe.
    """
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
    _openblas()
    with _our_cache_dir():
        kernels = {name: njit(cache=True, **options)(f) for name, (f, options) in _KERNELS.items()}
    event.register("numba:compile", _CompileNotice(kernels.values()))
    return SimpleNamespace(**kernels)


register_backend("numba", NumbaBackend)
