"""Numba training ops: the numba backend's table for ``npresnet.value_and_grad`` (NHWC activations).

Importing this module registers ``NumbaTrainingOps`` for models on the "numba" backend
(``npresnet.autograd.register_training_ops``); like ``cpu.py`` it raises ImportError where
numba is missing, and changes no process-wide setting. Its kernels are marked with cpu_kernels.py's
``kernel`` and are numba dispatchers from its ``compile_kernels`` (numba's JIT and its cache: a training
run outlasts numba's second of start-up); the inference kernels it calls through the backend are
loaded ahead of time, as for inference (``aot.py``).

Every op keeps the signature and the numbers of its NumPy reference in ``functional.py``
(through ``npresnet.autograd.TrainingOps``), with activations (N, H, W, C) instead of
(N, C, H, W); ``tests/test_kernels_train.py`` checks each against the reference, and
``tests/test_grad.py`` the whole pass against torch autograd. What runs where:
    conv2d            the backend's own convolution (Winograd for 3x3 stride 1 on maps from
                      4x4 up: F(4x4, 3x3) from 7x7, F(2x2, 3x3) below, StepBackend.winograd_tile_for;
                      GEMMs elsewhere) with a zero bias; its weights packed (``pack_weights``)
                      and Winograd-transformed (``winograd_weights``) by the pool's threads.
    conv2d_backward   weight gradient: for 3x3 stride 1 (maps from 4x4 up), by Winograd
                      F(4x4 or 2x2, 3x3) (``_weight_grad_winograd``: the input's and the
                      output gradient's tiles transformed, one GEMM per tile position, then
                      ``winograd_weight_grad``); else grad_out^T times patches (the backend's
                      im2col kernel, or the input itself for 1x1), one GEMM per chunk of output
                      rows, each thread summing its own share, the shares summed into torch's
                      layout by ``weight_grad_layout``; split by output channel instead where
                      the patches are small (layer4 on small images). Input gradient: for stride
                      1, a convolution of grad_out with the flipped, transposed weights on
                      the backend (so Winograd again for 3x3); for stride 2, grad_out times
                      the weights, then ``col2im`` adds each patch back onto its pixels
                      (threads split by image, so no two write one pixel).
    batch norm        per-channel sums in float64 (``channel_sums``, ``centred_square_sums``,
                      ``grad_sums``) over row blocks, the blocks shared out between the pool's
                      threads; normalising and the input gradient each one fused pass, written
                      over the array it no longer needs.
    relu, max pool    the same block-wise sharing (max-pool backward split by image); max-pool
                      backward rescans each window with torch's rule.
No kernel is a parallel numba loop: each is serial and GIL-free, and the backend's thread pool
(``NumbaBackend._split``) gives each thread its share, as for inference.
The GEMMs run in NumPy's BLAS, one thread each, inside the backend's thread pool (see cpu.py);
so does the fc layer's (``linear``): no call in a step wakes OpenBLAS's own threads, which spin
for about 80 ms after each multi-threaded call on the core the pool's second thread needs.

Reference: ``npresnet/functional.py`` (the ops) and ``npresnet/autograd.py`` (the pass).
"""
from __future__ import annotations

import functools

import numpy as np

from npresnet import functional as F
from npresnet.autograd import TrainingOps, register_training_ops
from npresnet.backends import FoldedConv

from . import cpu
from .cpu_kernels import compile_kernels, gather_tile, kernel

# Each thread's col2im GEMMs (and the forward's GEMM paths) take output rows in chunks of about this
# many bytes of patches: large enough for fast GEMMs, small enough to stay a bounded workspace.
CHUNK_BYTES = 1 << 23
# The weight gradient's GEMMs take chunks of about this many bytes of patches, but at least this many
# patch rows and twice the output channels: a chunk that stays in cache between its gathering and its
# GEMM (8 MB chunks were up to 30% slower), with enough rows that adding each chunk's product
# (K x R*S*C, half the chunk's size at most) into the sum stays cheap.
WEIGHT_GRAD_CHUNK_BYTES = 1 << 20
WEIGHT_GRAD_MIN_ROWS = 256
# Per-channel sums run over this many row blocks (shared out between threads), each summed in float64.
SUM_BLOCKS = 16


# The elementwise kernels below cut the rows into `blocks` slices and do slices b_lo <= b < b_hi, each
# looping from 0 within its slice: numba then knows every index is in bounds and non-negative, and
# vectorises the loop (indexing from a computed start was 10-20x slower). They are serial and GIL-free:
# NumbaTrainingOps._blockwise hands each thread of the backend's pool its share of the slices, as the
# inference kernels do, so no kernel is a parallel numba loop (whose compilation costs several times a
# serial kernel's, and whose threading layer must be loaded).


@kernel(nogil=True)
def channel_sums(x, out, blocks, b_lo, b_hi):
    """x (M, C) -> out (blocks, C) float64, zeroed by the caller: each block of rows summed per channel."""
    M, C = x.shape
    for b in range(b_lo, b_hi):
        rows = x[b * M // blocks : (b + 1) * M // blocks]
        acc = out[b]
        for i in range(rows.shape[0]):
            for c in range(C):
                acc[c] += rows[i, c]


@kernel(nogil=True)
def centred_square_sums(x, mean, out, blocks, b_lo, b_hi):
    """x (M, C), mean (C,) in x's dtype -> out (blocks, C) float64, zeroed by the caller: sums of
    (x - mean)^2 per block, squared in x's dtype."""
    M, C = x.shape
    for b in range(b_lo, b_hi):
        rows = x[b * M // blocks : (b + 1) * M // blocks]
        acc = out[b]
        for i in range(rows.shape[0]):
            for c in range(C):
                d = rows[i, c] - mean[c]
                acc[c] += d * d


@kernel(nogil=True)
def normalise(x, mean, inv_std, weight, bias, out, blocks, b_lo, b_hi):
    """x (M, C) <- x_hat = (x - mean) * inv_std, in place; out (M, C) = x_hat * weight + bias."""
    M, C = x.shape
    for b in range(b_lo, b_hi):
        lo, hi = b * M // blocks, (b + 1) * M // blocks
        rows, out_rows = x[lo:hi], out[lo:hi]
        for i in range(hi - lo):
            for c in range(C):
                v = (rows[i, c] - mean[c]) * inv_std[c]
                rows[i, c] = v
                out_rows[i, c] = v * weight[c] + bias[c]


@kernel(nogil=True)
def grad_sums(grad_out, x_hat, out, blocks, b_lo, b_hi):
    """(M, C) each -> out (blocks, 2, C) float64, zeroed by the caller: per block, sum(grad_out) and
    sum(grad_out * x_hat)."""
    M, C = grad_out.shape
    for b in range(b_lo, b_hi):
        lo, hi = b * M // blocks, (b + 1) * M // blocks
        g_rows, x_rows = grad_out[lo:hi], x_hat[lo:hi]
        acc = out[b]
        for i in range(hi - lo):
            for c in range(C):
                g = np.float64(g_rows[i, c])
                acc[0, c] += g
                acc[1, c] += g * x_rows[i, c]


@kernel(nogil=True)
def batch_norm_grad_input(grad_out, x_hat, scale, x_hat_coef, shift, out, blocks, b_lo, b_hi):
    """out (M, C) = (x_hat * x_hat_coef + grad_out - shift) * scale; out may be x_hat itself."""
    M, C = grad_out.shape
    for b in range(b_lo, b_hi):
        lo, hi = b * M // blocks, (b + 1) * M // blocks
        g_rows, x_rows, out_rows = grad_out[lo:hi], x_hat[lo:hi], out[lo:hi]
        for i in range(hi - lo):
            for c in range(C):
                out_rows[i, c] = (x_rows[i, c] * x_hat_coef[c] + g_rows[i, c] - shift[c]) * scale[c]


@kernel(nogil=True)
def relu_inplace(x, blocks, b_lo, b_hi):
    """x (M,) <- max(x, 0); NaN stays NaN."""
    M = x.shape[0]
    zero = np.zeros(1, dtype=x.dtype)[0]
    for b in range(b_lo, b_hi):
        part = x[b * M // blocks : (b + 1) * M // blocks]
        for i in range(part.shape[0]):
            v = part[i]
            part[i] = zero if v < 0 else v


@kernel(nogil=True)
def relu_backward_inplace(grad, out, blocks, b_lo, b_hi):
    """grad (M,) <- 0 where not out > 0 (torch's threshold_backward)."""
    M = grad.shape[0]
    zero = np.zeros(1, dtype=grad.dtype)[0]
    for b in range(b_lo, b_hi):
        lo, hi = b * M // blocks, (b + 1) * M // blocks
        g, o = grad[lo:hi], out[lo:hi]
        for i in range(hi - lo):
            g[i] = g[i] if o[i] > 0 else zero


@kernel(nogil=True)
def max_pool_3x3s2_backward(grad_out, x, n_lo, n_hi, grad_x):
    """grad_out (N, P, Q, C), x (N, H, W, C) -> grad_x (N, H, W, C) of images n_lo <= n < n_hi.

    Each window starts at its first element inside the image with maximum -inf and moves
    to each later element (row by row) greater than the maximum or NaN: torch's choice.
    The caller splits by image, so no two threads add to one pixel.
    """
    N, H, W, C = x.shape
    _, P, Q, _ = grad_out.shape
    grad_x[n_lo:n_hi] = 0  # here, not by the caller: each thread zeroes its own images (the stem's: 26 MB at 112)
    best = np.empty(C, dtype=x.dtype)
    where = np.empty(C, dtype=np.int64)  # h * W + w of the chosen element
    for n in range(n_lo, n_hi):
        pixels = grad_x[n].reshape(H * W, C)
        for p in range(P):
            h_lo, h_hi = max(2 * p - 1, 0), min(2 * p + 2, H)
            for q in range(Q):
                w_lo, w_hi = max(2 * q - 1, 0), min(2 * q + 2, W)
                for c in range(C):
                    best[c] = -np.inf
                    where[c] = h_lo * W + w_lo
                for h in range(h_lo, h_hi):
                    for w in range(w_lo, w_hi):
                        row = x[n, h, w]
                        hw = h * W + w
                        # Branch-free (selects, not jumps), so that the channel loop is vectorised.
                        for c in range(C):
                            v = row[c]
                            take = (v > best[c]) | (v != v)
                            best[c] = v if take else best[c]
                            where[c] = hw if take else where[c]
                go = grad_out[n, p, q]
                for c in range(C):
                    pixels[where[c], c] += go[c]


@kernel(nogil=True)
def col2im(cols, R, S, stride, padding, P, Q, job_lo, job_hi, grad_x):
    """The adjoint of cpu.im2col: add cols (G, (job_hi-job_lo)*Q, R*S*C/G), columns (r, s, c), of
    output rows job_lo <= (n, p) < job_hi onto grad_x (N, H, W, C) at the pixels they were read from.

    Serial and GIL-free; the caller gives each thread whole images.
    """
    N, H, W, C = grad_x.shape
    G = cols.shape[0]
    Cg = C // G
    for job in range(job_lo, job_hi):
        n = job // P
        p = job % P
        for q in range(Q):
            row = (job - job_lo) * Q + q
            for r in range(R):
                h = p * stride + r - padding
                if h < 0 or h >= H:
                    continue
                for s in range(S):
                    w = q * stride + s - padding
                    if w < 0 or w >= W:
                        continue
                    for g in range(G):
                        base = (r * S + s) * Cg
                        for c in range(Cg):
                            grad_x[n, h, w, g * Cg + c] += cols[g, row, base + c]


@kernel(nogil=True)
def pack_weights(w, p_lo, p_hi, out):
    """w (K, X, R, S), any strides -> panels p_lo <= p < p_hi of out (1, panels, R*S*X, NR): the GEMM
    weights of a groups-1 convolution as cpu.pack_panels lays them out (rows (r, s, x), output channels
    in panels of NR, zero past K). Given the weights flipped and transposed (a view), it packs the
    convolution of the input gradient with no copy of them in between."""
    K, X, R, S = w.shape
    NR = out.shape[3]
    for p in range(p_lo, p_hi):
        panel = out[0, p]
        width = min(NR, K - p * NR)
        # Row by row of the panel (its NR values contiguous), reading NR rows of w side by side: a
        # column at a time wrote each value NR*itemsize bytes past the last, over the whole panel NR times.
        for r in range(R):
            for s in range(S):
                for x in range(X):
                    row = panel[(r * S + s) * X + x]
                    for j in range(width):
                        row[j] = w[p * NR + j, x, r, s]
                    for j in range(width, NR):
                        row[j] = 0


@kernel(nogil=True)
def winograd_weights(w, Gm, p_lo, p_hi, out):
    """w (K, C, 3, 3), any strides; Gm (A, 3) float64 -> panels p_lo <= p < p_hi of out (A*A, panels, C, NR):
    U = Gm g Gm^T of every (input c, output k) pair, in float64 and rounded once, laid out as
    cpu.pack_panels packs U (A*A, C, K) for gemm_packed (zero past K). Each thread makes its own
    panels (made on the main thread with NumPy, layer2's took 11 ms a convolution, twice a step)."""
    K, C = w.shape[0], w.shape[1]
    A = Gm.shape[0]
    NR = out.shape[3]
    # One panel's NR output channels at a time, innermost, so that each step below is a vector operation.
    g = np.empty((9, NR))  # g[r*3 + s, j] of output channel p*NR + j
    rows = np.empty((A, 3, NR))  # Gm g
    for p in range(p_lo, p_hi):
        for c in range(C):
            for j in range(NR):
                k = p * NR + j
                for t in range(9):
                    g[t, j] = w[k, c, t // 3, t % 3] if k < K else 0.0
            for a in range(A):
                for s in range(3):
                    for j in range(NR):
                        rows[a, s, j] = Gm[a, 0] * g[s, j] + Gm[a, 1] * g[3 + s, j] + Gm[a, 2] * g[6 + s, j]
            for a in range(A):
                for b in range(A):
                    dst = out[a * A + b, p, c]
                    for j in range(NR):
                        dst[j] = rows[a, 0, j] * Gm[b, 0] + rows[a, 1, j] * Gm[b, 1] + rows[a, 2, j] * Gm[b, 2]


@kernel(nogil=True)
def weight_grad_layout(shares, Cg, k_lo, k_hi, out):
    """shares (T, K, R*S*Cg), columns (r, s, c) -> out (K, Cg, R*S) = shares[0] + ... + shares[T-1],
    rows k_lo <= k < k_hi: each thread's share of the weight gradient summed and put in torch's layout
    in one pass (a numpy transpose of layer4's gradient alone took 12 ms, on one thread)."""
    T, K, width = shares.shape
    RS = width // Cg
    for k in range(k_lo, k_hi):
        for rs in range(RS):
            for c in range(Cg):
                v = shares[0, k, rs * Cg + c]
                for t in range(1, T):
                    v += shares[t, k, rs * Cg + c]
                out[k, c, rs] = v


@kernel(nogil=True)
def winograd_grad_output(grad_out, m, t_lo, t_hi, work, gM):
    """grad_out (N, P, Q, K) -> gM (A*A, t_hi-t_lo, K) = At^T gY At of the m x m output tiles t_lo <= t < t_hi
    (zeros past the edge), m = 4 or 2, A = m + 2, in winograd_input's tile order: the gradient of the
    Winograd products M, since the forward's output tile is At M At^T (cpu_kernels.winograd_output).
    At^T (the transpose of WINOGRAD[m][2]) written out term by term, as winograd_input writes B^T, down
    the tile's columns, then along its rows. work: scratch (2, A, A, K). Serial and GIL-free, as winograd_input."""
    N, P, Q, K = grad_out.shape
    th = (P + m - 1) // m
    tw = (Q + m - 1) // m
    gy, tmp = work[0], work[1]  # gy[:m, :m]: the tile; tmp[:, :m]: At^T gY
    for t in range(t_lo, t_hi):
        n = t // (th * tw)
        i = (t // tw) % th
        j = t % tw
        u = t - t_lo
        gather_tile(grad_out, n, i * m, j * m, m, gy)
        if m == 4:
            for b in range(4):  # tmp[:, b] = At^T gY[:, b]
                for k in range(K):
                    g0, g1, g2, g3 = gy[0, b, k], gy[1, b, k], gy[2, b, k], gy[3, b, k]
                    even, odd = g0 + g2, g1 + g3
                    even4, odd8 = g0 + 4 * g2, 2 * g1 + 8 * g3
                    tmp[0, b, k] = g0
                    tmp[1, b, k] = even + odd
                    tmp[2, b, k] = even - odd
                    tmp[3, b, k] = even4 + odd8
                    tmp[4, b, k] = even4 - odd8
                    tmp[5, b, k] = g3
            for a in range(6):  # gM[a, :] = tmp[a] At
                for k in range(K):
                    g0, g1, g2, g3 = tmp[a, 0, k], tmp[a, 1, k], tmp[a, 2, k], tmp[a, 3, k]
                    even, odd = g0 + g2, g1 + g3
                    even4, odd8 = g0 + 4 * g2, 2 * g1 + 8 * g3
                    gM[a * 6, u, k] = g0
                    gM[a * 6 + 1, u, k] = even + odd
                    gM[a * 6 + 2, u, k] = even - odd
                    gM[a * 6 + 3, u, k] = even4 + odd8
                    gM[a * 6 + 4, u, k] = even4 - odd8
                    gM[a * 6 + 5, u, k] = g3
        else:
            for b in range(2):
                for k in range(K):
                    g0, g1 = gy[0, b, k], gy[1, b, k]
                    tmp[0, b, k] = g0
                    tmp[1, b, k] = g0 + g1
                    tmp[2, b, k] = g0 - g1
                    tmp[3, b, k] = -g1
            for a in range(4):
                for k in range(K):
                    g0, g1 = tmp[a, 0, k], tmp[a, 1, k]
                    gM[a * 4, u, k] = g0
                    gM[a * 4 + 1, u, k] = g0 + g1
                    gM[a * 4 + 2, u, k] = g0 - g1
                    gM[a * 4 + 3, u, k] = -g1


@kernel(nogil=True)
def winograd_weight_grad(gU, Gm, k_lo, k_hi, out):
    """gU (A*A, K, C), the gradient of the Winograd weights U = Gm g Gm^T; Gm (A, 3) float64 -> out (K, C, 3, 3)
    = Gm^T gU Gm for output channels k_lo <= k < k_hi, in float64 and rounded once."""
    C = gU.shape[2]
    A = Gm.shape[0]
    rows = np.empty((A, 3, C))  # rows[i, s] = sum over j of gU[i*A + j] Gm[j, s]
    acc = np.empty(C)
    for k in range(k_lo, k_hi):
        for i in range(A):
            for s in range(3):
                for c in range(C):
                    rows[i, s, c] = 0.0
            for j in range(A):
                src = gU[i * A + j, k]
                for s in range(3):
                    g = Gm[j, s]
                    if g != 0:
                        for c in range(C):
                            rows[i, s, c] += g * src[c]
        for r in range(3):
            for s in range(3):
                for c in range(C):
                    acc[c] = 0.0
                for i in range(A):
                    g = Gm[i, r]
                    if g != 0:
                        for c in range(C):
                            acc[c] += g * rows[i, s, c]
                for c in range(C):
                    out[k, c, r, s] = acc[c]


def _blocks(M: int) -> int:
    return max(1, min(SUM_BLOCKS, M))


class StepConv(cpu.PreparedConv):
    """A convolution prepared for one training step (its weights change at every step): Winograd
    only where asked (winograd=False: the GEMM path), and its weights made by kernels shared out
    between the backend's threads: groups-1 weights packed by pack_weights (on one thread, layer4's
    packing took 5 ms a convolution, twice a step), Winograd weights by winograd_weights. A convolution
    that runs by Winograd (StepBackend picks a tile for every one) is not packed for the GEMM path at all."""

    def __init__(self, conv: FoldedConv, winograd: bool, backend: cpu.NumbaBackend):
        self.backend = backend
        self.given_weight = conv.weight  # (K, C/G, R, S), maybe a flipped view: the Winograd weights are made from it
        self.wants_winograd = winograd
        super().__init__(conv)

    def runs_winograd(self, conv: FoldedConv) -> bool:
        return self.wants_winograd and super().runs_winograd(conv)

    def weight(self) -> np.ndarray:
        """The weights (K, C/G, R, S) as given (a copy): what the NumPy stand-in of a kernel being built reads."""
        return np.array(self.given_weight)

    def pack(self, weight):
        if self.winograd:
            return None  # U instead: 26 of a resnet18 step's 33 packings were of such layers, and never read
        K = weight.shape[0]
        NR = cpu.panel_width(weight.dtype)
        panels = -(-K // NR)
        packed = np.empty((1, panels, weight[0].size, NR), dtype=weight.dtype)
        kernels = compile_kernels(__name__)
        self.backend._split(lambda lo, hi: kernels.pack_weights(weight, lo, hi, packed), panels)
        return packed

    def U(self, tile: int) -> np.ndarray:
        if tile not in self._U:
            _, Gm, _ = cpu.WINOGRAD[tile]
            NR = cpu.panel_width(self.dtype)
            panels = -(-self.K // NR)
            U = np.empty(((tile + 2) ** 2, panels, self.Cg, NR), dtype=self.dtype)  # packed as gemm_packed reads it
            kernels = compile_kernels(__name__)
            self.backend._split(lambda lo, hi: kernels.winograd_weights(self.given_weight, Gm, lo, hi, U), panels)
            self._U[tile] = U
        return self._U[tile]


class StepBackend(cpu.NumbaBackend):
    """The numba backend as a training step runs its convolutions: GEMM chunks of CHUNK_BYTES, and
    Winograd's tile by map size alone.

    Inference's 1 MiB chunks (batch 1) would make each of layer4's GEMMs at batch 32 re-read its
    9 MB of weights every 56 rows.
    """

    CHUNK_BYTES = CHUNK_BYTES
    # Winograd's 4x4 output tile on maps of at least this size, else 2x2: on smaller maps the 4x4 tile's
    # transformed weights (36 products a weight, 4x the plain ones, made afresh at every step) and its
    # overhang cost more than its 2.25x fewer multiplications than F(2x2) save (layer4 at 112: 4x4 maps).
    winograd_tile4_min_size = 7

    def winograd_tile_for(self, P: int, Q: int) -> int:
        """The Winograd output tile of the training pass's 3x3 stride-1 convolutions on P x Q maps."""
        return 4 if min(P, Q) >= self.winograd_tile4_min_size else 2

    def _winograd_tile(self, conv: cpu.PreparedConv, N: int, P: int, Q: int) -> int:
        return self.winograd_tile_for(P, Q) if conv.winograd else 0


@functools.lru_cache(maxsize=None)
def step_backend(threads: int) -> StepBackend:
    """One StepBackend (and its thread pool) per thread count, for the whole process."""
    return StepBackend(threads=threads)


class NumbaTrainingOps(TrainingOps):
    """TrainingOps over NHWC activations on a NumbaBackend (a StepBackend for value_and_grad); see the module docstring."""

    # Winograd for 3x3 stride-1 convolutions on maps of at least this size, in the forward and the input
    # gradient, and for their weight gradients (_weight_grad_winograd); the tile: StepBackend.winograd_tile_for.
    winograd_min_size = 4

    def __init__(self, backend: cpu.NumbaBackend):
        super().__init__(backend)
        self.kernels = compile_kernels(__name__)

    # --- layout ---------------------------------------------------------------------------

    def from_numpy(self, x):
        out = np.empty((x.shape[0], x.shape[2], x.shape[3], x.shape[1]), dtype=x.dtype)  # (N, H, W, C)

        def images(lo, hi):  # numpy lets go of the GIL to copy
            out[lo:hi] = x[lo:hi].transpose(0, 2, 3, 1)

        self.backend._split(images, x.shape[0])
        return out

    # --- convolution ----------------------------------------------------------------------

    def _winograd(self, x) -> bool:
        """Whether a convolution that winograd_fits runs by Winograd on x's maps (N, H, W, C): winograd_min_size."""
        return min(x.shape[1:3]) >= self.winograd_min_size

    def conv2d(self, x, weight, stride, padding, groups):
        zero = np.zeros(weight.shape[0], dtype=weight.dtype)
        conv = StepConv(FoldedConv(weight, zero, stride, padding, groups), self._winograd(x), self.backend)
        return self.backend.conv(x, conv, relu=False)

    def conv2d_backward(self, grad_out, x, weight, stride, padding, groups, input_grad=True):
        """grad_out (N, P, Q, K), x (N, H, W, C), weight (K, C/G, R, S) -> (grad_x (N, H, W, C) or None, grad_weight)."""
        grad_weight = self._weight_grad(grad_out, x, weight, stride, padding, groups)
        if not input_grad:
            return None, grad_weight
        K, Cg, R, S = weight.shape
        if stride == 1 and padding <= min(R, S) - 1:
            # grad_x[h, w] = sum over (r, s) of grad_out[h + padding - r, w + padding - s] . weight[r, s]:
            # a convolution of grad_out with the weights flipped and transposed, padding R - 1 - padding.
            G = groups
            flipped = F.flipped_kernel(weight, G)  # (C, K/G, R, S); with groups 1 a view, which pack_weights reads in place
            zero = np.zeros(G * Cg, dtype=weight.dtype)
            transposed = StepConv(FoldedConv(flipped, zero, 1, R - 1 - padding, G), self._winograd(grad_out), self.backend)
            return self.backend.conv(grad_out, transposed, relu=False), grad_weight
        return self._input_grad_col2im(grad_out, x.shape, weight, stride, padding, groups), grad_weight

    def _rows_per_chunk(self, Q, width, G, itemsize):
        return max(1, CHUNK_BYTES // (Q * G * width * itemsize))

    def _weight_grad(self, grad_out, x, weight, stride, padding, groups):
        """grad_weight[g] = grad_out[g]^T @ patches[g], (K/G, R*S*C/G) per group, then put in torch's layout.

        Shared out between threads by output channels where the patches are small beside the gradient
        (layer4 on small maps: each thread then makes its rows of the gradient alone, with no sum of
        shares), else by output rows, each thread summing its own share chunk by chunk, and the shares
        summed (and laid out) by weight_grad_layout, again split by output channel.
        """
        backend, kernels = self.backend, self.kernels
        N, P, Q, K = grad_out.shape
        _, Cg, R, S = weight.shape
        G, Kg, width = groups, K // groups, R * S * Cg
        dtype = grad_out.dtype
        go = grad_out.reshape(N * P * Q, K)
        grad_weight = np.empty(weight.shape, dtype=dtype)  # (K, C/G, R, S)
        if cpu.winograd_fits(R, S, stride, padding, G) and self._winograd(grad_out):
            return self._weight_grad_winograd(grad_out, x, grad_weight)
        one_by_one = R == S == 1 and padding == 0 and G == 1
        if one_by_one:
            strided = x[:, ::stride, ::stride, :] if stride > 1 else x  # (N, P, Q, C)
        layout = grad_weight.reshape(K, Cg, R * S)

        def patches(j, k):  # (G, (k-j)*Q, width): the patches of output rows j <= (n, p) < k
            if one_by_one:
                return strided.reshape(N * P, Q, -1)[j:k].reshape(1, (k - j) * Q, -1)
            cols = backend._workspace("train_cols", (G, (k - j) * Q, width), dtype)
            backend.kernels.im2col(x, R, S, stride, padding, P, Q, j, k, cols)
            return cols

        if G == 1 and N * P * Q <= 2 * K:
            if one_by_one:
                cols = patches(0, N * P)
            else:  # gathered once, by both threads, then read by each
                cols = backend._workspace("train_cols_all", (1, N * P * Q, width), dtype)
                backend._split(lambda lo, hi: backend.kernels.im2col(x, R, S, stride, padding, P, Q, lo, hi, cols[:, lo * Q : hi * Q]), N * P)
            product = backend._workspace("train_dw_all", (1, K, width), dtype)

            def channels(lo, hi):
                np.matmul(go[:, lo:hi].T, cols[0], out=product[0, lo:hi])
                kernels.weight_grad_layout(product, Cg, lo, hi, layout)

            with cpu._single_threaded_blas():
                backend._split(channels, K)
            return grad_weight

        rows = max(WEIGHT_GRAD_MIN_ROWS, 2 * Kg, WEIGHT_GRAD_CHUNK_BYTES // (G * width * grad_out.itemsize))
        step = max(1, rows // Q)
        parts = min(backend.threads, N * P)
        shares = backend._workspace("train_dw_shares", (parts, K, width), dtype)

        def share(lo, hi):
            mine = shares[-(-lo * parts // (N * P))]  # this thread's: _split's share i starts at N*P*i//parts
            for j in range(lo, hi, step):
                k = min(j + step, hi)
                cols = patches(j, k)
                for g in range(G):
                    a, dst = go[j * Q : k * Q, g * Kg : (g + 1) * Kg].T, mine[g * Kg : (g + 1) * Kg]
                    if j == lo:
                        np.matmul(a, cols[g], out=dst)
                    else:
                        product = backend._workspace("train_dw", (Kg, width), dtype)
                        np.matmul(a, cols[g], out=product)
                        dst += product

        with cpu._single_threaded_blas():
            backend._split(share, N * P)
        backend._split(lambda lo, hi: kernels.weight_grad_layout(shares, Cg, lo, hi, layout), K)
        return grad_weight

    def _weight_grad_winograd(self, grad_out, x, grad_weight):
        """The weight gradient of a 3x3, stride-1, padding-1 convolution (groups 1) by Winograd F(m x m, 3x3).

        The forward's products are M[ij] = U[ij] @ V[ij] for each of the A*A positions ij of a tile
        (U = Gm g Gm^T the weights', V = Bt d Bt^T each input tile's transform), so the gradient of U is
        grad_U[ij] = grad_M[ij]^T @ V[ij] over every tile, grad_M = At^T grad_tile At, and grad_g = Gm^T grad_U Gm:
        A*A GEMMs whose inner length is the number of tiles, 9*m*m/A^2 of the direct products' work (4x fewer
        for m = 4). Three steps, each shared out between the threads: the two transforms (one thread makes
        V, the other grad_M, each over every tile), the GEMMs (by position ij), the weight transform (by
        output channel, into torch's layout).
        """
        backend = self.backend
        N, H, W, C = x.shape
        K = grad_out.shape[3]
        m = backend.winograd_tile_for(H, W)
        A = m + 2
        Gm = cpu.WINOGRAD[m][1]
        T = N * -(-H // m) * -(-W // m)
        dtype = x.dtype
        V = backend._workspace("wgrad V", (A * A, T, C), dtype)
        gM = backend._workspace("wgrad M", (A * A, T, K), dtype)

        def transforms(lo, hi):  # job 0: V, job 1: grad_M, each over every tile (one buffer each, whole GEMMs after)
            if lo == 0:
                backend.kernels.winograd_input(x, m, 0, T, backend._workspace("winograd in", (2, A, A, C), dtype), V)
            if hi == 2:
                self.kernels.winograd_grad_output(grad_out, m, 0, T, backend._workspace("wgrad out", (2, A, A, K), dtype), gM)

        backend._split(transforms, 2)
        gU = backend._workspace("wgrad U", (A * A, K, C), dtype)

        def positions(lo, hi):
            for ij in range(lo, hi):
                np.matmul(gM[ij].T, V[ij], out=gU[ij])  # (K, C)

        with cpu._single_threaded_blas():
            backend._split(positions, A * A)
        backend._split(lambda lo, hi: self.kernels.winograd_weight_grad(gU, Gm, lo, hi, grad_weight), K)
        return grad_weight

    def _input_grad_col2im(self, grad_out, x_shape, weight, stride, padding, groups):
        """grad_cols = grad_out[g] @ weight[g] per chunk of output rows, added back onto the pixels by col2im."""
        backend = self.backend
        N, P, Q, K = grad_out.shape
        _, Cg, R, S = weight.shape
        G, Kg, width = groups, K // groups, R * S * Cg
        dtype = grad_out.dtype
        go = grad_out.reshape(N * P * Q, K)
        w = np.ascontiguousarray(weight.reshape(G, Kg, Cg, R, S).transpose(0, 1, 3, 4, 2)).reshape(G, Kg, width)
        grad_x = np.empty(x_shape, dtype=dtype)  # (N, H, W, C)
        step = self._rows_per_chunk(Q, width, G, grad_out.itemsize)

        def images(lo, hi):
            grad_x[lo:hi] = 0  # each thread zeroes its own images (numpy lets go of the GIL to fill)
            for j in range(lo * P, hi * P, step):
                k = min(j + step, hi * P)
                cols = backend._workspace("train_cols", (G, (k - j) * Q, width), dtype)
                for g in range(G):
                    np.matmul(go[j * Q : k * Q, g * Kg : (g + 1) * Kg], w[g], out=cols[g])
                self.kernels.col2im(cols, R, S, stride, padding, P, Q, j, k, grad_x)

        with cpu._single_threaded_blas():
            backend._split(images, N)
        return grad_x

    # --- batch norm -----------------------------------------------------------------------

    def batch_norm_train(self, x, running_mean, running_var, weight, bias, momentum):
        """As F.batch_norm_train on x (N, H, W, C); x's memory becomes the saved x_hat."""
        C = x.shape[-1]
        x2 = x.reshape(-1, C)
        M = x2.shape[0]
        if M < 2:
            raise ValueError(f"batch norm in training mode needs more than 1 value per channel, got input {x.shape} (as in torch)")
        sums = np.zeros((_blocks(M), C))
        self._blockwise(self.kernels.channel_sums, x2, sums, blocks=_blocks(M))
        mean = sums.sum(axis=0) / M  # (C,) float64
        sums[...] = 0
        self._blockwise(self.kernels.centred_square_sums, x2, mean.astype(x.dtype), sums, blocks=_blocks(M))
        var = sums.sum(axis=0) / M  # biased
        inv_std = (1.0 / np.sqrt(var + F.BN_EPS)).astype(x.dtype)
        out = np.empty_like(x)
        self._blockwise(
            self.kernels.normalise, x2, mean.astype(x.dtype), inv_std, weight.astype(x.dtype), bias.astype(x.dtype),
            out.reshape(-1, C), blocks=_blocks(M),
        )
        if running_mean is not None:
            running_mean[...] = (1 - momentum) * running_mean + momentum * mean
        if running_var is not None:
            running_var[...] = (1 - momentum) * running_var + momentum * (var * M / (M - 1))
        return out, (x, inv_std, True)

    def batch_norm_eval(self, x, running_mean, running_var, weight, bias):
        """As F.batch_norm_eval on x (N, H, W, C); x's memory becomes the saved x_hat."""
        C = x.shape[-1]
        inv_std = (1.0 / np.sqrt(running_var.astype(np.float64) + F.BN_EPS)).astype(x.dtype)
        out = np.empty_like(x)
        x2 = x.reshape(-1, C)
        self._blockwise(
            self.kernels.normalise, x2, running_mean.astype(x.dtype), inv_std, weight.astype(x.dtype),
            bias.astype(x.dtype), out.reshape(-1, C), blocks=_blocks(x2.shape[0]),
        )
        return out, (x, inv_std, False)

    def batch_norm_backward(self, grad_out, saved, weight):
        """As F.batch_norm_backward on (N, H, W, C); grad_x is written over the saved x_hat."""
        x_hat, inv_std, training = saved
        C = grad_out.shape[-1]
        dtype = grad_out.dtype
        go, xh = grad_out.reshape(-1, C), x_hat.reshape(-1, C)
        M = go.shape[0]
        block_sums = np.zeros((_blocks(M), 2, C))
        self._blockwise(self.kernels.grad_sums, go, xh, block_sums, blocks=_blocks(M))
        sums = block_sums.sum(axis=0)  # (2, C) float64
        grad_bias, grad_weight = sums[0], sums[1]
        scale = (weight.astype(np.float64) * inv_std).astype(dtype)
        if training:
            coef, shift = (-grad_weight / M).astype(dtype), (grad_bias / M).astype(dtype)
        else:
            coef, shift = np.zeros(C, dtype=dtype), np.zeros(C, dtype=dtype)
        self._blockwise(self.kernels.batch_norm_grad_input, go, xh, scale, coef, shift, xh, blocks=_blocks(M))
        return x_hat, grad_weight.astype(dtype), grad_bias.astype(dtype)

    # --- the rest -------------------------------------------------------------------------

    def _blockwise(self, kernel, *args, blocks):
        """kernel(*args, blocks, b_lo, b_hi) over the slices 0 <= b < blocks, one share per pool thread."""
        self.backend._split(lambda lo, hi: kernel(*args, blocks, lo, hi), blocks)

    def relu_(self, x):
        self._blockwise(self.kernels.relu_inplace, x.reshape(-1), blocks=_blocks(x.size))
        return x

    def relu_backward_(self, grad_out, out):
        self._blockwise(self.kernels.relu_backward_inplace, grad_out.reshape(-1), out.reshape(-1), blocks=_blocks(out.size))
        return grad_out

    def max_pool2d(self, x):
        return self.backend.max_pool(x), x  # the backward kernel finds each window's winner in x again

    def max_pool2d_backward(self, grad_out, x):
        # A workspace, not a new array: the stem's 26 MB (at 112) came fresh from the system at every step, and
        # its first touch (the kernel's zeroing, in page faults) made this pass 20-50 ms instead of a few.
        # The pass reads it before its next call (the stem's ReLU and convolution backward).
        grad_x = self.backend._workspace("train max-pool grad", x.shape, x.dtype)
        self.backend._split(lambda lo, hi: self.kernels.max_pool_3x3s2_backward(grad_out, x, lo, hi, grad_x), x.shape[0])
        return grad_x

    def linear(self, x, weight, bias):
        # Single-threaded: after a multi-threaded call OpenBLAS's worker spins for about 80 ms, on the core
        # that the pool's second thread needs (it cost a 2-thread step at 112 a quarter of its CPU time).
        with cpu._single_threaded_blas():
            return super().linear(x, weight, bias)

    def linear_backward(self, grad_out, x, weight):
        with cpu._single_threaded_blas():
            return super().linear_backward(grad_out, x, weight)

    def global_avg_pool(self, x):
        return x.mean(axis=(1, 2))  # (N, C)

    def global_avg_pool_backward(self, grad_out, x):
        N, H, W, C = x.shape
        return np.broadcast_to((grad_out / (H * W))[:, None, None, :], x.shape).copy()


register_training_ops("numba", lambda backend: NumbaTrainingOps(step_backend(backend.threads)))
