"""Numba CPU kernels: the "numba" backend (NHWC activations, fused epilogues, Winograd 3x3).

Importing this module registers the backend with ``npresnet.backends``; it raises
ImportError where numba is missing, so ``backend="auto"`` falls back to NumPy.
Importing it changes nothing else in the process. Creating the first ``NumbaBackend``
does, once (``compile_kernels``): it hands the kernels below to numba (each is compiled, or
loaded from the kernel cache, at its first call), and finds the OpenBLAS that NumPy loaded,
to run it single-threaded where the backend calls it. No kernel is a parallel numba loop, so
numba's threading layer is never loaded or configured.

Variants, chosen on each call in ``NumbaBackend.conv``, one method each:
    winograd  3x3, stride 1, padding 1, groups 1: Winograd F(m x m, 3x3), m = 4 or 2
              (float32 and float64; chosen per call from the number of tiles, see
              NumbaBackend._winograd_tile): input transform -> one GEMM per tile
              element (gemm_packed) -> output transform with bias, residual and
              ReLU fused, so each output activation is written once.
    1x1       1x1 stride-1 convolutions (groups 1): the NHWC activation is already the
              GEMM's left matrix; gemm_packed finishes bias/residual/ReLU in registers.
    direct    other convolutions of groups 1 (the 7x7 stem, stride-2 3x3 and 1x1, 3x3 on maps too
              small for Winograd): conv_packed, gemm_packed's loop reading each window
              in place from the input padded once (an implicit GEMM: no patch matrix).
    im2col    grouped convolutions (ResNeXt's 3x3): NHWC patches gathered, one BLAS GEMM
              per group, fused epilogue.
    The 1x1, direct and im2col paths hand each thread one share of the output rows (or,
    where the weights outweigh the patches, of the output channels) and let it gather,
    multiply and finish its share alone: one thread synchronisation per layer.

The GEMMs of ungrouped convolutions run in gemm_packed: a register-blocked kernel
(a 6 x 16 float32 or 6 x 8 float64 block of the output in twelve AVX2 registers, as
the microkernels of BLIS and MLAS) over weights packed once into panels of 16 (8)
output channels; LLVM does not vectorise that blocking from scalar code, so it is
written with explicit SIMD vectors (``SimdVector`` and the ``simd_*`` intrinsics).
Grouped convolutions use NumPy's BLAS (numba's own np.dot would need SciPy), set to
one thread meanwhile. A small thread pool (the nogil kernels and BLAS release the GIL)
hands each thread one share of the layer, which it gathers or transforms, multiplies
and finishes alone: one thread synchronisation per convolution (each costs a thread
wake-up: bench/results/notes.md), and OpenBLAS's own threads (which spin after each
call) stay idle. Max pooling is split the same way: no kernel is a parallel Numba
loop, whose threading layer and parfor compilation cost seconds of start-up.

Numerics: no fastmath (NaN and inf behave as in the reference); gemm_packed uses fused
multiply-adds (llvm.fma: one rounding per step, no reassociation), and the Winograd
weight transform is done in float64 and rounded once. A model's batch norm is not folded
into the weights here: its scale multiplies each sum in the epilogue (in U for Winograd), so
that the packed weights are the model's own, reordered, and the model need not keep another
copy (``NumbaBackend.keeps_weights``). Measured against the
float64 reference: see bench/ and tests/test_kernels_cpu.py.

Compiled kernels are cached on disk (``cache=True``) under
``npresnet.backends.kernel_cache_dir()`` ($NUMBA_CACHE_DIR when the user set it, else
$NPRESNET_HOME/numba, else ~/.cache/npresnet/numba), so a read-only
site-packages still gets a cache and a second process does not recompile.
Numba fixes a function's cache directory when it is decorated, so the kernels
are decorated (``njit``) in ``compile_kernels``, not at import. Each kernel is compiled (or
loaded from the cache) at its first call, for the types of that call only; the first compile in a
process says so on stderr (the "npresnet" logger), so a first run does not look like a hang.

References: Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks"
(2015) for the Winograd matrices; CS231n ``fast_layers.py`` for im2col; Goto & van de
Geijn, "Anatomy of High-Performance Matrix Multiplication" (2008) and BLIS's
microkernel design for the packed, register-blocked GEMM.
Tests: ``python -m pytest -q tests/test_kernels_cpu.py``; speed: ``python bench/run.py``.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np

from npresnet.backends import Backend, ConvBatchNorm, FoldedConv, kernel_cache_dir, register_backend
from npresnet.functional import conv_output_size

from . import scipy_hidden_from_numba

with scipy_hidden_from_numba():
    import numba  # ImportError here keeps the backend unregistered: the point of this module
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, event
from numba.extending import intrinsic, models, register_model

# The kernels, as Python functions, of this module and of the others that use `kernel` (train.py):
# module name -> {name: (function, njit options)}. compile_kernels(module) compiles one module's.
_KERNELS: dict[str, dict[str, tuple]] = {}


def kernel(**options):
    """Mark a function as a Numba kernel (njit with `options`, cached on disk), compiled by compile_kernels."""

    def mark(py_func):
        _KERNELS.setdefault(py_func.__module__, {})[py_func.__name__] = (py_func, options)
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


# --- SIMD vectors for the packed GEMM -------------------------------------------------------------
# LLVM does not vectorise a register-blocked GEMM tile written with scalars (it keeps 96 scalar
# accumulators), so the tile is written with explicit vectors: a numba type whose LLVM form is
# <L x float> (L = 8 for float32, 4 for float64, one AVX2 register) and four intrinsics. Loads and
# stores take a flat index and skip numba's negative-index wraparound, whose extra instructions in
# the inner loop cost a third of the speed (bench/results/notes.md); callers keep indices in range.


class SimdVector(types.Type):
    """An AVX2 register of `dtype` values (8 float32 or 4 float64)."""

    def __init__(self, dtype):
        self.dtype = dtype
        super().__init__(name=f"SimdVector({dtype})")


@register_model(SimdVector)
class _SimdVectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _llvm_vector(fe_type.dtype))


def _llvm_vector(dtype):
    return ir.VectorType(ir.FloatType() if dtype == types.float32 else ir.DoubleType(), 256 // dtype.bitwidth)


def _element_pointer(context, builder, array_type, array, index):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


@intrinsic
def simd_load(typingctx, array, index):
    """The vector at flat[index : index + L] of a C-contiguous array (no bounds or wraparound)."""

    def codegen(context, builder, sig, args):
        pointer = _element_pointer(context, builder, sig.args[0], *args)
        return builder.load(builder.bitcast(pointer, _llvm_vector(sig.args[0].dtype).as_pointer()), align=4)

    return SimdVector(array.dtype)(array, index), codegen


@intrinsic
def simd_store(typingctx, array, index, vector):
    """flat[index : index + L] = vector."""

    def codegen(context, builder, sig, args):
        pointer = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(pointer, _llvm_vector(sig.args[0].dtype).as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(array, index, vector), codegen


@intrinsic
def simd_zero(typingctx, array):
    """A vector of zeros of array's dtype."""

    def codegen(context, builder, sig, args):
        vector = _llvm_vector(sig.args[0].dtype)
        return ir.Constant(vector, [0.0] * vector.count)

    return SimdVector(array.dtype)(array), codegen


@intrinsic
def simd_finish(typingctx, vector, scale, bias, column, residual, has_residual, relu, out, index):
    """out.flat[index : index + L] = [relu](vector * scale[column : column + L] + bias[column : column + L]
    [+ residual.flat[index : ...]]): the multiply and each add rounded on their own, as in scalar code.

    Branch-free: residual is always read (the backend passes out itself when there is none, which
    the store reads anyway), then chosen or not; ReLU keeps NaN, as np.maximum(x, 0).
    """

    def codegen(context, builder, sig, args):
        v, scale_, bias_, column_, residual_, has_residual_, relu_, out_, index_ = args
        vector_type = v.type
        pointer_type = vector_type.as_pointer()

        def load(array_type, array, i):
            pointer = _element_pointer(context, builder, array_type, array, i)
            return builder.load(builder.bitcast(pointer, pointer_type), align=4)

        v = builder.fmul(v, load(sig.args[1], scale_, column_))
        v = builder.fadd(v, load(sig.args[2], bias_, column_))
        v = builder.select(has_residual_, builder.fadd(v, load(sig.args[4], residual_, index_)), v)
        zero = ir.Constant(vector_type, [0.0] * vector_type.count)
        negative = builder.fcmp_ordered("<", v, zero)
        negative = builder.select(relu_, negative, ir.Constant(negative.type, [0] * vector_type.count))
        v = builder.select(negative, zero, v)
        pointer = _element_pointer(context, builder, sig.args[7], out_, index_)
        builder.store(v, builder.bitcast(pointer, pointer_type), align=4)
        return context.get_dummy_value()

    return types.none(vector, scale, bias, column, residual, has_residual, relu, out, index), codegen


@intrinsic
def simd_fma(typingctx, acc, array, index, vector):
    """acc + flat[index] * vector (the scalar broadcast to every lane), fused, rounded once."""

    def codegen(context, builder, sig, args):
        vector_type = _llvm_vector(sig.args[0].dtype)
        scalar = builder.load(_element_pointer(context, builder, sig.args[1], args[1], args[2]))
        lanes = builder.insert_element(ir.Constant(vector_type, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count)
        lanes = builder.shuffle_vector(lanes, ir.Constant(vector_type, ir.Undefined), zeros)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vector_type, [vector_type] * 3), f"llvm.fma.v{vector_type.count}f{sig.args[0].dtype.bitwidth}"
        )
        return builder.call(fma, [lanes, args[3], args[0]])

    return acc(acc, array, index, vector), codegen


# --- the 6 x NR block's way out, shared by gemm_packed and conv_packed (inlined into each) -----------
# Twelve accumulators c<row><half> hold a block of six output rows by NR = 2L channels; o is the flat
# index in out (and residual, laid out alike) of the block's first element, K the length of a row.


@njit(inline="always")
def finish_block(c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51,
                 scale, bias, col, rf, has_residual, relu, of, o, K, L):
    """A whole block, finished in registers straight into out: scale, bias, residual, ReLU."""
    simd_finish(c00, scale, bias, col, rf, has_residual, relu, of, o)
    simd_finish(c01, scale, bias, col + L, rf, has_residual, relu, of, o + L)
    o += K
    simd_finish(c10, scale, bias, col, rf, has_residual, relu, of, o)
    simd_finish(c11, scale, bias, col + L, rf, has_residual, relu, of, o + L)
    o += K
    simd_finish(c20, scale, bias, col, rf, has_residual, relu, of, o)
    simd_finish(c21, scale, bias, col + L, rf, has_residual, relu, of, o + L)
    o += K
    simd_finish(c30, scale, bias, col, rf, has_residual, relu, of, o)
    simd_finish(c31, scale, bias, col + L, rf, has_residual, relu, of, o + L)
    o += K
    simd_finish(c40, scale, bias, col, rf, has_residual, relu, of, o)
    simd_finish(c41, scale, bias, col + L, rf, has_residual, relu, of, o + L)
    o += K
    simd_finish(c50, scale, bias, col, rf, has_residual, relu, of, o)
    simd_finish(c51, scale, bias, col + L, rf, has_residual, relu, of, o + L)


@njit(inline="always")
def store_block(tf, L, c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51):
    """A block into the tile (6, NR), for finish_tile."""
    NR = 2 * L
    simd_store(tf, 0, c00)
    simd_store(tf, L, c01)
    simd_store(tf, NR, c10)
    simd_store(tf, NR + L, c11)
    simd_store(tf, 2 * NR, c20)
    simd_store(tf, 2 * NR + L, c21)
    simd_store(tf, 3 * NR, c30)
    simd_store(tf, 3 * NR + L, c31)
    simd_store(tf, 4 * NR, c40)
    simd_store(tf, 4 * NR + L, c41)
    simd_store(tf, 5 * NR, c50)
    simd_store(tf, 5 * NR + L, c51)


@njit(inline="always")
def finish_tile(tf, rows, width, NR, scale, bias, col, rf, has_residual, relu, of, o, K):
    """The first `rows` rows and `width` columns of the tile, finished element by element into out
    (a block cut short by the last rows or a last, partial panel)."""
    for i in range(rows):
        for j in range(width):
            v = tf[i * NR + j] * scale[col + j] + bias[col + j]
            if has_residual:
                v += rf[o + i * K + j]
            if relu and v < 0:  # written so that NaN stays NaN, as np.maximum(x, 0)
                v = 0
            of[o + i * K + j] = v


@kernel(nogil=True)
def gemm_packed(a, Wp, scale, bias, residual, has_residual, relu, p_lo, p_hi, tile, out):
    """out[e] (M, K) = [relu](a[e] (M, D) @ W[e] * scale + bias [+ residual[e] (M, K)]) for every e < E, in the
    output channels of panels p_lo <= p < p_hi (E = 1 for a convolution, A*A for Winograd's GEMMs).

    Wp (E, ceil(K/NR), D, NR) is each W[e] (D, K) cut into panels of NR = 2L columns (zero-padded):
    each 6 x NR block of out is summed in 12 vector registers over all of D, then finished (scale, bias,
    residual, ReLU) in registers on its way out: the only pass over the output. The last rows (fewer
    than 6) and a last, partial panel go through tile (6, NR) and are finished element by element.
    Panels go in groups whose weights fit in L2; each group passes over all rows, six at a time, and
    each six rows over all of the group's panels: the six rows of `a` stay in L1, and out and
    residual are walked row by row (walking them a panel at a time, down a column strip at a
    power-of-two stride, was slower: bench/results/notes.md). a, Wp, out and residual C-contiguous.
    Serial and GIL-free: each pool thread runs its own rows or panels.
    """
    E, M, D = a.shape
    K = out.shape[2]
    NR = Wp.shape[3]
    L = NR // 2
    tf = tile.reshape(-1)
    group = max(1, (1 << 18) // (D * NR * a.itemsize))  # panels whose weights fit in L2 together
    af = a.reshape(-1)
    wf = Wp.reshape(-1)
    of = out.reshape(-1)
    rf = residual.reshape(-1)
    panels = Wp.shape[1]
    for e in range(E):
        a0 = e * M * D  # a[e], Wp[e], out[e] and residual[e] in the flat arrays
        o0 = e * M * K
        for g_lo in range(p_lo, p_hi, group):
            for i0 in range(0, M, 6):
                rows = min(6, M - i0)
                for p in range(g_lo, min(g_lo + group, p_hi)):
                    w0 = (e * panels + p) * D * NR
                    col = p * NR
                    width = min(NR, K - col)
                    if rows == 6:
                        c00 = simd_zero(a)
                        c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = c00
                        r0 = a0 + i0 * D
                        for k in range(D):
                            b0 = simd_load(wf, w0 + k * NR)
                            b1 = simd_load(wf, w0 + k * NR + L)
                            r = r0 + k
                            c00 = simd_fma(c00, af, r, b0)
                            c01 = simd_fma(c01, af, r, b1)
                            r += D
                            c10 = simd_fma(c10, af, r, b0)
                            c11 = simd_fma(c11, af, r, b1)
                            r += D
                            c20 = simd_fma(c20, af, r, b0)
                            c21 = simd_fma(c21, af, r, b1)
                            r += D
                            c30 = simd_fma(c30, af, r, b0)
                            c31 = simd_fma(c31, af, r, b1)
                            r += D
                            c40 = simd_fma(c40, af, r, b0)
                            c41 = simd_fma(c41, af, r, b1)
                            r += D
                            c50 = simd_fma(c50, af, r, b0)
                            c51 = simd_fma(c51, af, r, b1)
                        o = o0 + i0 * K + col
                        if width == NR:
                            finish_block(c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51,
                                         scale, bias, col, rf, has_residual, relu, of, o, K, L)
                            continue
                        store_block(tf, L, c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51)
                    else:
                        for i in range(rows):
                            c0 = simd_zero(a)
                            c1 = c0
                            r0 = a0 + (i0 + i) * D
                            for k in range(D):
                                c0 = simd_fma(c0, af, r0 + k, simd_load(wf, w0 + k * NR))
                                c1 = simd_fma(c1, af, r0 + k, simd_load(wf, w0 + k * NR + L))
                            simd_store(tf, i * NR, c0)
                            simd_store(tf, i * NR + L, c1)
                    finish_tile(tf, rows, width, NR, scale, bias, col, rf, has_residual, relu, of, o0 + i0 * K + col, K)

@kernel(nogil=True)
def conv_packed(xp, Wp, scale, bias, residual, has_residual, relu, R, stride, P, Q, m_lo, m_hi, p_lo, p_hi, tile, out):
    """Output pixels m_lo <= m < m_hi of a convolution, out (N*P*Q, K) = [relu](conv * scale + bias [+ residual]),
    in the output channels of panels p_lo <= p < p_hi, without gathering patches.

    xp (N, Hp, Wq, C) is the input already zero-padded, so that the window of output pixel
    m = (n, p, q) is xp[n, p*stride : p*stride + R, q*stride : q*stride + S, :], whose S*C values
    of each kernel row r lie in one contiguous run: gemm_packed's loop with `a` read in place
    (an implicit GEMM over Wp (1, ceil(K/NR), R*S*C, NR)). Six consecutive output pixels at a time,
    their windows wherever they lie; a last block of fewer repeats its last pixel and keeps only its
    own rows. Serial and GIL-free: each pool thread runs its own pixels or panels.
    """
    N, Hp, Wq, C = xp.shape
    D = Wp.shape[2]
    run = D // R
    K = out.shape[1]
    NR = Wp.shape[3]
    L = NR // 2
    xf = xp.reshape(-1)
    wf = Wp.reshape(-1)
    of = out.reshape(-1)
    rf = residual.reshape(-1)
    tf = tile.reshape(-1)
    row = Wq * C
    group = max(1, (1 << 18) // (D * NR * xp.itemsize))
    for g_lo in range(p_lo, p_hi, group):
        for i0 in range(m_lo, m_hi, 6):
            rows = min(6, m_hi - i0)
            # Where each of the six windows starts in xf.
            m = i0
            x0 = ((m // (P * Q) * Hp + (m // Q) % P * stride) * Wq + m % Q * stride) * C
            m = i0 + min(1, rows - 1)
            x1 = ((m // (P * Q) * Hp + (m // Q) % P * stride) * Wq + m % Q * stride) * C
            m = i0 + min(2, rows - 1)
            x2 = ((m // (P * Q) * Hp + (m // Q) % P * stride) * Wq + m % Q * stride) * C
            m = i0 + min(3, rows - 1)
            x3 = ((m // (P * Q) * Hp + (m // Q) % P * stride) * Wq + m % Q * stride) * C
            m = i0 + min(4, rows - 1)
            x4 = ((m // (P * Q) * Hp + (m // Q) % P * stride) * Wq + m % Q * stride) * C
            m = i0 + min(5, rows - 1)
            x5 = ((m // (P * Q) * Hp + (m // Q) % P * stride) * Wq + m % Q * stride) * C
            for p in range(g_lo, min(g_lo + group, p_hi)):
                w = p * D * NR
                col = p * NR
                width = min(NR, K - col)
                c00 = simd_zero(xp)
                c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = c00
                for r in range(R):
                    shift = r * row
                    for j in range(run):
                        b0 = simd_load(wf, w)
                        b1 = simd_load(wf, w + L)
                        w += NR
                        c00 = simd_fma(c00, xf, x0 + shift + j, b0)
                        c01 = simd_fma(c01, xf, x0 + shift + j, b1)
                        c10 = simd_fma(c10, xf, x1 + shift + j, b0)
                        c11 = simd_fma(c11, xf, x1 + shift + j, b1)
                        c20 = simd_fma(c20, xf, x2 + shift + j, b0)
                        c21 = simd_fma(c21, xf, x2 + shift + j, b1)
                        c30 = simd_fma(c30, xf, x3 + shift + j, b0)
                        c31 = simd_fma(c31, xf, x3 + shift + j, b1)
                        c40 = simd_fma(c40, xf, x4 + shift + j, b0)
                        c41 = simd_fma(c41, xf, x4 + shift + j, b1)
                        c50 = simd_fma(c50, xf, x5 + shift + j, b0)
                        c51 = simd_fma(c51, xf, x5 + shift + j, b1)
                o = i0 * K + col
                if rows == 6 and width == NR:
                    finish_block(c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51,
                                 scale, bias, col, rf, has_residual, relu, of, o, K, L)
                    continue
                store_block(tf, L, c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51)
                finish_tile(tf, rows, width, NR, scale, bias, col, rf, has_residual, relu, of, o, K)


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
def epilogue(src, scale, bias, residual, has_residual, relu, out):
    """out (M, K) = [relu](src * scale + bias [+ residual]); src (G, M, K/G) may be out itself when G == 1.

    Serial and GIL-free, called by each pool thread on the chunk it just multiplied (still in cache).
    """
    G, M, Kg = src.shape
    for row in range(M):
        for g in range(G):
            for kk in range(Kg):
                k = g * Kg + kk
                v = src[g, row, kk] * scale[k] + bias[k]
                if has_residual:
                    v += residual[row, k]
                if relu and v < 0:  # written so that NaN stays NaN, as np.maximum(x, 0)
                    v = 0
                out[row, k] = v

@kernel(nogil=True)
def winograd_input(x, m, t_lo, t_hi, V):
    """x (N, H, W, C) -> V (A*A, t_hi-t_lo, C) = B^T d B for tiles t_lo <= t < t_hi, m = 4 or 2.

    A = m + 2; tiles in row-major (n, tile row, tile column) order; the patch of
    tile (i, j) is the A x A patch d at (i*m - 1, j*m - 1) (padding 1), zeros outside x.
    B^T (WINOGRAD[m][0]) is written out term by term, each a loop over the contiguous channels:
    B^T d down the columns of d, then the same along its rows.
    Serial and GIL-free: each pool thread transforms its own share of the tiles.
    """
    N, H, W, C = x.shape
    A = m + 2
    th = (H + m - 1) // m
    tw = (W + m - 1) // m
    d = np.empty((A, A, C), dtype=x.dtype)
    tmp = np.empty((A, A, C), dtype=x.dtype)
    for t in range(t_lo, t_hi):
        n = t // (th * tw)
        i = (t // tw) % th
        j = t % tw
        u = t - t_lo
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
        if m == 4:
            for b in range(6):  # tmp[:, b] = B^T d[:, b]
                for c in range(C):
                    d0, d1, d2, d3, d4, d5 = d[0, b, c], d[1, b, c], d[2, b, c], d[3, b, c], d[4, b, c], d[5, b, c]
                    tmp[0, b, c] = 4 * d0 - 5 * d2 + d4
                    tmp[1, b, c] = d3 + d4 - 4 * (d1 + d2)
                    tmp[2, b, c] = 4 * (d1 - d2) + d4 - d3
                    tmp[3, b, c] = 2 * (d3 - d1) + d4 - d2
                    tmp[4, b, c] = 2 * (d1 - d3) + d4 - d2
                    tmp[5, b, c] = 4 * d1 - 5 * d3 + d5
            for a in range(6):  # V[a, :] = tmp[a] B
                for c in range(C):
                    d0, d1, d2, d3, d4, d5 = tmp[a, 0, c], tmp[a, 1, c], tmp[a, 2, c], tmp[a, 3, c], tmp[a, 4, c], tmp[a, 5, c]
                    V[a * 6, u, c] = 4 * d0 - 5 * d2 + d4
                    V[a * 6 + 1, u, c] = d3 + d4 - 4 * (d1 + d2)
                    V[a * 6 + 2, u, c] = 4 * (d1 - d2) + d4 - d3
                    V[a * 6 + 3, u, c] = 2 * (d3 - d1) + d4 - d2
                    V[a * 6 + 4, u, c] = 2 * (d1 - d3) + d4 - d2
                    V[a * 6 + 5, u, c] = 4 * d1 - 5 * d3 + d5
        else:
            for b in range(4):
                for c in range(C):
                    d0, d1, d2, d3 = d[0, b, c], d[1, b, c], d[2, b, c], d[3, b, c]
                    tmp[0, b, c] = d0 - d2
                    tmp[1, b, c] = d1 + d2
                    tmp[2, b, c] = d2 - d1
                    tmp[3, b, c] = d1 - d3
            for a in range(4):
                for c in range(C):
                    d0, d1, d2, d3 = tmp[a, 0, c], tmp[a, 1, c], tmp[a, 2, c], tmp[a, 3, c]
                    V[a * 4, u, c] = d0 - d2
                    V[a * 4 + 1, u, c] = d1 + d2
                    V[a * 4 + 2, u, c] = d2 - d1
                    V[a * 4 + 3, u, c] = d1 - d3

@kernel(nogil=True)
def winograd_output(Mt, m, bias, residual, has_residual, relu, t_lo, t_hi, out):
    """Mt (A*A, t_hi-t_lo, K) -> out (N, P, Q, K) = [relu](A^T M A + bias [+ residual]) for
    tiles t_lo <= t < t_hi, clipped at the edge. A^T (WINOGRAD[m][2]) written out term by term,
    as in winograd_input. Serial and GIL-free, as winograd_input."""
    N, P, Q, K = out.shape
    A = m + 2
    th = (P + m - 1) // m
    tw = (Q + m - 1) // m
    tmp = np.empty((m, A, K), dtype=out.dtype)
    y = np.empty((m, m, K), dtype=out.dtype)
    for t in range(t_lo, t_hi):
        n = t // (th * tw)
        i = (t // tw) % th
        j = t % tw
        u = t - t_lo
        if m == 4:
            for b in range(6):  # tmp[:, b] = A^T M[:, b]
                for k in range(K):
                    m0, m1, m2, m3 = Mt[b, u, k], Mt[6 + b, u, k], Mt[12 + b, u, k], Mt[18 + b, u, k]
                    m4, m5 = Mt[24 + b, u, k], Mt[30 + b, u, k]
                    tmp[0, b, k] = m0 + (m1 + m2) + (m3 + m4)
                    tmp[1, b, k] = (m1 - m2) + 2 * (m3 - m4)
                    tmp[2, b, k] = (m1 + m2) + 4 * (m3 + m4)
                    tmp[3, b, k] = (m1 - m2) + 8 * (m3 - m4) + m5
            for a in range(4):  # y[a] = tmp[a] A
                for k in range(K):
                    m0, m1, m2, m3, m4, m5 = tmp[a, 0, k], tmp[a, 1, k], tmp[a, 2, k], tmp[a, 3, k], tmp[a, 4, k], tmp[a, 5, k]
                    y[a, 0, k] = m0 + (m1 + m2) + (m3 + m4)
                    y[a, 1, k] = (m1 - m2) + 2 * (m3 - m4)
                    y[a, 2, k] = (m1 + m2) + 4 * (m3 + m4)
                    y[a, 3, k] = (m1 - m2) + 8 * (m3 - m4) + m5
        else:
            for b in range(4):
                for k in range(K):
                    m0, m1, m2, m3 = Mt[b, u, k], Mt[4 + b, u, k], Mt[8 + b, u, k], Mt[12 + b, u, k]
                    tmp[0, b, k] = m0 + m1 + m2
                    tmp[1, b, k] = m1 - m2 - m3
            for a in range(2):
                for k in range(K):
                    m0, m1, m2, m3 = tmp[a, 0, k], tmp[a, 1, k], tmp[a, 2, k], tmp[a, 3, k]
                    y[a, 0, k] = m0 + m1 + m2
                    y[a, 1, k] = m1 - m2 - m3
        for a in range(m):
            p = i * m + a
            if p >= P:
                break
            for b in range(m):
                q = j * m + b
                if q >= Q:
                    break
                for k in range(K):
                    v = y[a, b, k] + bias[k]
                    if has_residual:
                        v += residual[n, p, q, k]
                    if relu and v < 0:  # written so that NaN stays NaN, as np.maximum(x, 0)
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


def panel_width(dtype) -> int:
    """NR, the output channels of one packed panel: two 32-byte SIMD registers (16 float32, 8 float64)."""
    return 2 * 32 // np.dtype(dtype).itemsize


def pack_panels(w: np.ndarray, dtype=None) -> np.ndarray:
    """w (E, ..., K) -> (E, ceil(K/NR), D, NR) in `dtype` (default w's), D the product of the middle
    axes in C order: gemm_packed's weights, NR = two SIMD registers of output channels (16 float32 or
    8 float64), the last panel zero-padded. Filled panel by panel from w as it is (a transposed view
    will do), so that packing holds no whole-size temporary beside its result."""
    dtype = np.dtype(dtype or w.dtype)
    E, K = w.shape[0], w.shape[-1]
    D = math.prod(w.shape[1:-1])
    NR = panel_width(dtype)
    panels = -(-K // NR)
    packed = np.empty((E, panels, D, NR), dtype=dtype)
    for p in range(panels):
        width = min(NR, K - p * NR)
        packed[:, p, :, :width] = w[..., p * NR : p * NR + width].reshape(E, D, width)
        packed[:, p, :, width:] = 0
    return packed


class PreparedConv:
    """A convolution in the forms its kernels want (see the module docstring for the variants):
    y = conv2d(x, weight) * scale + bias, scale and bias per output channel.

    Groups 1: Wp (1, ceil(K/NR), R*S*C, NR), the GEMM's weights (R*S*C, K) packed for gemm_packed
    (pack_panels). Grouped: W (G, R*S*C/G, K/G) for NumPy's BLAS. Both are the weights as given,
    reordered, so that plain_weights gives them back bit for bit. For 3x3 stride-1 convolutions also
    the Winograd weights U of each tile size, made on first use: G (g * scale) G^T for each of the A*A
    tile elements, (A*A, C, K) packed the same way.

    scale: a batch norm's scale (K,), float64, applied after the sum (None: 1, a folded convolution),
    so that the weights need no folded copy.
    """

    def __init__(self, conv: FoldedConv, scale: np.ndarray | None = None):
        K, Cg, R, S = conv.weight.shape
        G = conv.groups
        self.K, self.Cg, self.R, self.S, self.G = K, Cg, R, S, G
        self.stride, self.padding = conv.stride, conv.padding
        self.dtype = conv.weight.dtype
        self.bias = np.ascontiguousarray(conv.bias)
        self.batch_norm_scale = scale
        self.scale = np.ones(K, dtype=self.dtype) if scale is None else scale.astype(self.dtype)
        self.W = self.Wp = None
        if G == 1:
            self.Wp = self.pack(conv.weight)
        else:
            w = conv.weight.reshape(G, K // G, Cg, R, S).transpose(0, 3, 4, 2, 1)  # (G, R, S, C/G, K/G)
            self.W = np.ascontiguousarray(w.reshape(G, R * S * Cg, K // G))
        self.winograd = (R, S, conv.stride, conv.padding, G) == (3, 3, 1, 1, 1)
        self._U: dict[int, np.ndarray] = {}
        # The scale and bias of Winograd's GEMMs: the batch norm's scale is in U, its bias added by the output transform.
        self.zeros = np.zeros(K, dtype=self.dtype) if self.winograd else None
        self.ones = np.ones(K, dtype=self.dtype) if self.winograd else None

    def pack(self, weight: np.ndarray) -> np.ndarray:
        """Wp of groups-1 weights (K, C, R, S); a subclass may pack them another way."""
        return pack_panels(weight.transpose(2, 3, 1, 0)[None])  # from (1, R, S, C, K), a view

    def plain_weights(self) -> np.ndarray:
        """The weights as (G, R*S*C/G, K/G), unpacked if packed."""
        if self.W is not None:
            return self.W
        _, panels, D, NR = self.Wp.shape
        return self.Wp.transpose(0, 2, 1, 3).reshape(1, D, panels * NR)[:, :, : self.K]

    def weight(self) -> np.ndarray:
        """The weights (K, C/G, R, S) as given, bit for bit: a new array."""
        G, K, Cg, R, S = self.G, self.K, self.Cg, self.R, self.S
        w = self.plain_weights().reshape(G, R, S, Cg, K // G).transpose(0, 4, 3, 1, 2)  # (G, K/G, C/G, R, S)
        return np.ascontiguousarray(w).reshape(K, Cg, R, S)

    def U(self, tile: int) -> np.ndarray:
        if tile not in self._U:
            _, Gm, _ = WINOGRAD[tile]
            A = tile + 2
            _, panels, D, NR = self.Wp.shape
            scale = np.zeros(panels * NR)  # (the last panel's padding has zero weights)
            scale[: self.K] = 1 if self.batch_norm_scale is None else self.batch_norm_scale
            U = np.empty((A * A, panels, self.Cg, NR), dtype=self.dtype)
            # U = G g G^T for every (input, output) channel pair, in float64 and rounded once; a panel of
            # NR output channels at a time, straight into gemm_packed's layout (as pack_panels would put it).
            for p in range(panels):
                g = self.Wp[0, p].astype(np.float64) * scale[p * NR : (p + 1) * NR]  # (R*S*C, NR)
                rows = np.matmul(Gm, g.reshape(3, 3 * self.Cg * NR)).reshape(A, 3, self.Cg * NR)  # (A, S, C*NR)
                U[:, p] = np.matmul(Gm, rows).reshape(A * A, self.Cg, NR)  # (A, A, C*NR)
            self._U[tile] = U
        return self._U[tile]


class NumbaBackend(Backend):
    """Numba kernels over NHWC activations, BLAS for the GEMMs; see the module docstring."""

    name = "numba"
    # Not thread-safe: a grouped convolution sets OpenBLAS's process-wide thread count for its duration,
    # and the per-thread workspaces assume one caller at a time.
    thread_safe = False
    # Winograd only with at least this many tiles per call (see _winograd_tile).
    MIN_TILES = 32
    # Rows of the GEMM paths are gathered, multiplied and finished in chunks of at least this many
    # bytes of patches (or outputs), which bounds the patch workspace at large batches; smaller
    # chunks make small, slow GEMMs (bench/results/notes.md).
    CHUNK_BYTES = 1 << 20

    def __init__(self, threads: int | None = None, winograd_tile: int = 4):
        self.kernels = compile_kernels(__name__)
        self.threads = min(threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
        self.winograd_tile = winograd_tile
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None

    # --- threads ---------------------------------------------------------------------------

    def _split(self, work, length):
        """work(lo, hi) over [0, length) cut into one contiguous share per thread; returns when all are done.

        Each share does its whole layer step (gather or transform, single-threaded BLAS,
        epilogue) alone: one thread synchronisation per layer. OpenBLAS splitting each
        GEMM itself meant one per GEMM (36 per Winograd layer), ruinous when the cores
        are shared, and its spinning threads stole cores from the next kernels.
        """
        parts = min(self.threads, length)
        bounds = [length * i // parts for i in range(parts + 1)]
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

    # The batch norm's scale is applied after the sum, so the packed weights are the model's own, reordered.
    keeps_weights = True

    def prepare_conv_bn(self, conv: ConvBatchNorm) -> PreparedConv:
        weight, dtype = conv.weight.astype(conv.dtype, copy=False), conv.dtype
        return PreparedConv(FoldedConv(weight, conv.bias.astype(dtype), conv.stride, conv.padding, conv.groups), conv.scale)

    def conv_weight(self, prepared: PreparedConv) -> np.ndarray:
        return prepared.weight()

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

    def linear_weight(self, prepared) -> np.ndarray:
        return np.ascontiguousarray(prepared[0].T)

    # --- ops -------------------------------------------------------------------------------

    def _workspace(self, name, shape, dtype):
        """A scratch array reused across calls (per thread): saves page faults on every conv."""
        spaces = self._local.__dict__.setdefault("spaces", {})
        size = math.prod(shape)
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
        tile = self._winograd_tile(conv, N, P, Q)
        if tile:
            self._conv_winograd(x, conv, relu, residual, out, tile)
        elif conv.R == conv.S == 1 and conv.padding == 0 and conv.stride == 1 and conv.G == 1:
            self._conv_1x1(x, conv, relu, residual, out)
        elif conv.G == 1:
            self._conv_direct(x, conv, relu, residual, out)
        else:
            self._conv_im2col(x, conv, relu, residual, out)
        return out

    def _conv_winograd(self, x, conv: PreparedConv, relu, residual, out, m):
        """3x3 stride 1: each thread transforms, multiplies and finishes its own tiles (one synchronisation)."""
        N, P, Q, _ = out.shape
        A = m + 2
        T = N * ((P + m - 1) // m) * ((Q + m - 1) // m)
        U = conv.U(m)
        has_residual = residual is not None
        res = residual if has_residual else out  # a placeholder of the right type when there is none

        def tiles(lo, hi):
            V = self._workspace("V", (A * A, hi - lo, conv.Cg), x.dtype)
            self.kernels.winograd_input(x, m, lo, hi, V)
            Mt = self._workspace("M", (A * A, hi - lo, conv.K), x.dtype)
            tile = self._workspace("tile", (6, U.shape[3]), x.dtype)
            self.kernels.gemm_packed(V, U, conv.ones, conv.zeros, Mt, False, False, 0, U.shape[1], tile, Mt)
            self.kernels.winograd_output(Mt, m, conv.bias, res, has_residual, relu, lo, hi, out)

        self._split(tiles, T)

    def _conv_1x1(self, x, conv: PreparedConv, relu, residual, out):
        """1x1, stride 1, groups 1: the NHWC input is already the GEMM's left matrix."""
        a = x.reshape(1, -1, x.shape[3])  # (1, N*H*W, C)
        Q = out.shape[2]
        self._gemm(conv, relu, residual, out, lambda j, k: a[:, j * Q : k * Q])

    def _conv_im2col(self, x, conv: PreparedConv, relu, residual, out):
        """Grouped convolutions: NHWC patches gathered (per thread, per chunk), then the GEMMs."""
        _, P, Q, _ = out.shape
        width = conv.R * conv.S * conv.Cg

        def patches(j, k):
            cols = self._workspace("cols", (conv.G, (k - j) * Q, width), x.dtype)
            self.kernels.im2col(x, conv.R, conv.S, conv.stride, conv.padding, P, Q, j, k, cols)
            return cols

        self._gemm(conv, relu, residual, out, patches)

    def _conv_direct(self, x, conv: PreparedConv, relu, residual, out):
        """Groups 1, any kernel: conv_packed on the input padded once (an implicit GEMM, no patches)."""
        N, H, W, C = x.shape
        _, P, Q, K = out.shape
        pad = conv.padding
        xp = x
        if pad:
            xp = self._workspace("padded", (N, H + 2 * pad, W + 2 * pad, C), x.dtype)
            xp[:, :pad] = 0
            xp[:, H + pad :] = 0
            xp[:, pad : H + pad, :pad] = 0
            xp[:, pad : H + pad, W + pad :] = 0
            xp[:, pad : H + pad, pad : W + pad] = x
        M = N * P * Q
        out2 = out.reshape(M, K)
        has_residual = residual is not None
        res2 = (residual if has_residual else out).reshape(M, K)
        panels = conv.Wp.shape[1]
        args = (conv.R, conv.stride, P, Q)

        def pixels(lo, hi):
            tile = self._workspace("tile", (6, conv.Wp.shape[3]), x.dtype)
            self.kernels.conv_packed(xp, conv.Wp, conv.scale, conv.bias, res2, has_residual, relu, *args, 6 * lo, min(6 * hi, M), 0, panels, tile, out2)

        def columns(lo, hi):
            tile = self._workspace("tile", (6, conv.Wp.shape[3]), x.dtype)
            self.kernels.conv_packed(xp, conv.Wp, conv.scale, conv.bias, res2, has_residual, relu, *args, 0, M, lo, hi, tile, out2)

        if conv.Wp.nbytes > M * conv.Wp.shape[2] * x.itemsize:
            self._split(columns, panels)  # the weights outweigh the patches: each thread reads its share
        else:
            self._split(pixels, -(-M // 6))

    def _gemm(self, conv: PreparedConv, relu, residual, out, patches):
        """out = epilogue(patches @ W), where patches(j, k) is the (G, (k-j)*Q, R*S*C/G) patch matrix
        of output rows j <= (n, p) < k. The work is split between threads by output channels where the
        weights outweigh the patches (layer4 at batch 1: each thread then reads only its share of the
        weights), else by output rows, chunk by chunk: gather, multiply, finish while still in cache.
        Groups 1 run gemm_packed (GEMM and epilogue in one pass); grouped convolutions NumPy's BLAS."""
        N, P, Q, K = out.shape
        M, G, width = N * P * Q, conv.G, conv.R * conv.S * conv.Cg
        has_residual = residual is not None
        out2 = out.reshape(M, K)
        res2 = (residual if has_residual else out).reshape(M, K)
        kernels = self.kernels
        if G == 1:
            panels = conv.Wp.shape[1]
            tile_shape = (6, conv.Wp.shape[3])
            if conv.Wp.nbytes > M * width * out.itemsize:
                a = np.ascontiguousarray(patches(0, N * P))  # (1, M, width), gathered once, read by every thread

                def columns(lo, hi):
                    tile = self._workspace("tile", tile_shape, out.dtype)
                    kernels.gemm_packed(a, conv.Wp, conv.scale, conv.bias, res2[None], has_residual, relu, lo, hi, tile, out2[None])

                self._split(columns, panels)
                return
        step = max(1, self.CHUNK_BYTES // (Q * max(G * width, K) * out.itemsize))

        def rows(lo, hi):
            for j in range(lo, hi, step):
                k = min(j + step, hi)
                span = slice(j * Q, k * Q)
                cols = patches(j, k)  # (G, (k-j)*Q, width)
                if G == 1:
                    tile = self._workspace("tile", tile_shape, out.dtype)
                    a = np.ascontiguousarray(cols)
                    kernels.gemm_packed(a, conv.Wp, conv.scale, conv.bias, res2[None, span], has_residual, relu, 0, panels, tile, out2[None, span])
                    continue
                src = self._workspace("gemm", (G, (k - j) * Q, K // G), out.dtype)
                np.matmul(cols, conv.W, out=src)
                kernels.epilogue(src, conv.scale, conv.bias, res2[span], has_residual, relu, out2[span])

        if G == 1:
            self._split(rows, N * P)
            return
        with _single_threaded_blas():
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
    """_find_openblas, once per process (first asked for by compile_kernels)."""
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
    our kernels (inference's or training's) is compiled in this process, so that a first run's seconds of
    compiling do not look like a hang. Numba announces only real compilations ("numba:compile"), not loads
    from the kernel cache."""

    def __init__(self):
        self.dispatchers: set[int] = set()
        self.said = False
        event.register("numba:compile", self)

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
def _compile_notice() -> _CompileNotice:
    return _CompileNotice()


@functools.lru_cache(maxsize=None)
def compile_kernels(module: str) -> SimpleNamespace:
    """The @kernel functions of `module` (this one, or train.py) as numba dispatchers, once per process,
    when the first backend (or training table) needing them is made. Each kernel is compiled, or loaded
    from the kernel cache, at its first call (for the argument types of that call), so a model compiles
    only the kernels and specialisations it runs; compiling is announced (_CompileNotice).

    Also the OpenBLAS probe, made here and not at import.
    """
    _openblas()
    with scipy_hidden_from_numba():  # numba's CPU target imports arraymath at the first call; here, without SciPy
        importlib.import_module("numba.np.arraymath")
    with _our_cache_dir():
        kernels = {name: njit(cache=True, **options)(f) for name, (f, options) in _KERNELS[module].items()}
    _compile_notice().dispatchers.update(id(d) for d in kernels.values())
    return SimpleNamespace(**kernels)


register_backend("numba", NumbaBackend)
