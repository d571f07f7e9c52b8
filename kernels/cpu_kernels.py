"""The Numba kernels of the "numba" backend (``npresnet_kernels.cpu``), and numba's part in them.

Importing this module imports numba and defines the kernels: only a process that compiles does so.
``npresnet_kernels.aot`` builds each inference kernel, for the argument types of its first call, into an
object file in the kernel cache, which later processes load without numba; the training ops
(``train.py``) mark theirs with the same ``kernel`` and take them as numba dispatchers from
``compile_kernels`` (numba's JIT and its own cache), as does any kernel the ahead-of-time build cannot serve.

So that a kernel can be built ahead of time and loaded without numba, it allocates nothing (scratch
arrays come from the caller) and calls none of numba's C helpers (``flat`` below replaces reshape(-1)):
either would need numba's runtime, which lives in numba's extension modules.

The GEMMs of ungrouped convolutions run in gemm_packed: a register-blocked kernel (a 6 x NR block of the
output in twelve SIMD registers, as the microkernels of BLIS and MLAS; NR = two registers: 32 float32 or
16 float64 with AVX-512, 16 or 8 with AVX2, ``aot.simd_bytes``) over weights packed once into panels of
NR output channels; LLVM does not vectorise that blocking from
scalar code, so it is written with explicit SIMD vectors (``SimdVector`` and the ``simd_*`` intrinsics).
Every kernel is serial and GIL-free: the backend's helper threads (``threads.py``) each take a share.

Numerics: no fastmath (NaN and inf behave as in the reference); gemm_packed uses fused multiply-adds
(llvm.fma: one rounding per step, no reassociation).

References: Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2015) for the Winograd
matrices; CS231n ``fast_layers.py`` for im2col; Goto & van de Geijn, "Anatomy of High-Performance Matrix
Multiplication" (2008) and BLIS's microkernel design for the packed, register-blocked GEMM.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from types import SimpleNamespace

from npresnet.backends import kernel_cache_dir

from . import COMPILING, announce, scipy_hidden_from_numba
from .aot import simd_bytes

with scipy_hidden_from_numba():
    import numba
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, event
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, models, register_model
from numba.np.arrayobj import populate_array

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
    # One folder per vector width: numba's cache keys on the CPU, not on simd_bytes, which an override changes.
    numba.config.CACHE_DIR = os.path.join(kernel_cache_dir(), f"simd{simd_bytes()}")
    try:
        yield
    finally:
        numba.config.CACHE_DIR = ""


# --- SIMD vectors for the packed GEMM -------------------------------------------------------------
# LLVM does not vectorise a register-blocked GEMM tile written with scalars (it keeps 96 scalar
# accumulators), so the tile is written with explicit vectors: a numba type whose LLVM form is
# <L x float> (one register of aot.simd_bytes(): L = 16 float32 or 8 float64 with AVX-512, 8 or 4 with
# AVX2) and four intrinsics. Loads and
# stores take a flat index and skip numba's negative-index wraparound, whose extra instructions in
# the inner loop cost a third of the speed (bench/results/notes.md); callers keep indices in range.


class SimdVector(types.Type):
    """One SIMD register of `dtype` values (aot.simd_bytes() wide)."""

    def __init__(self, dtype):
        self.dtype = dtype
        super().__init__(name=f"SimdVector({dtype})")


@register_model(SimdVector)
class _SimdVectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _llvm_vector(fe_type.dtype))


def _llvm_vector(dtype):
    return ir.VectorType(ir.FloatType() if dtype == types.float32 else ir.DoubleType(), 8 * simd_bytes() // dtype.bitwidth)


def _element_pointer(context, builder, array_type, array, index):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


@intrinsic
def flat(typingctx, array):
    """A C-contiguous array as a 1-D view, as array.reshape(-1), without the call into numba's C helpers
    (numba_attempt_nocopy_reshape) that reshape makes, which a kernel loaded without numba cannot link."""
    if not isinstance(array, types.Array) or array.layout != "C":
        return None

    def codegen(context, builder, sig, args):
        src = context.make_array(sig.args[0])(context, builder, args[0])
        dst = context.make_array(sig.return_type)(context, builder)
        populate_array(
            dst, data=src.data, shape=cgutils.pack_array(builder, [src.nitems]),
            strides=cgutils.pack_array(builder, [src.itemsize]), itemsize=src.itemsize,
            meminfo=src.meminfo, parent=src.parent,
        )
        return impl_ret_borrowed(context, builder, sig.return_type, dst._getvalue())

    return array.copy(ndim=1)(array), codegen


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
def simd_max_nan(typingctx, acc, v):
    """v where v > acc or v is NaN, else acc, lane by lane: the max pool's step (NaN, once met, stays)."""

    def codegen(context, builder, sig, args):
        a, b = args
        take = builder.or_(builder.fcmp_ordered(">", b, a), builder.fcmp_unordered("uno", b, b))
        return builder.select(take, b, a)

    return acc(acc, v), codegen


@intrinsic
def simd_add(typingctx, a, b):
    """a + b, lane by lane."""

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def simd_lanes(typingctx, array):
    """L, the values of array's dtype in one vector (a constant)."""

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(64), _llvm_vector(sig.args[0].dtype).count)

    return types.int64(array), codegen


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


# --- the 6 x NR block: its steps and its way out, shared by gemm_packed and conv_packed (inlined) --------
# Twelve accumulators c<row><half> hold a block of six output rows by NR = 2L channels; o is the flat
# index in out (and residual, laid out alike) of the block's first element, K the length of a row.


@njit(inline="always")
def fma_step(c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51, xf, x0, x1, x2, x3, x4, x5, wf, w, L):
    """One step of the block over D: row i's element xf[x<i>] times the panel's row at wf[w], its two
    vectors (b0, b1), added to c<i>0 and c<i>1. Returns the twelve accumulators."""
    b0 = simd_load(wf, w)
    b1 = simd_load(wf, w + L)
    return (simd_fma(c00, xf, x0, b0), simd_fma(c01, xf, x0, b1),
            simd_fma(c10, xf, x1, b0), simd_fma(c11, xf, x1, b1),
            simd_fma(c20, xf, x2, b0), simd_fma(c21, xf, x2, b1),
            simd_fma(c30, xf, x3, b0), simd_fma(c31, xf, x3, b1),
            simd_fma(c40, xf, x4, b0), simd_fma(c41, xf, x4, b1),
            simd_fma(c50, xf, x5, b0), simd_fma(c51, xf, x5, b1))


@njit(inline="always")
def finish(c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51,
           rows, width, tf, scale, bias, col, rf, has_residual, relu, of, o, K, L):
    """The block into out: whole (6 rows, a full panel) in registers, else through the tile, keeping its
    first `rows` rows and `width` columns."""
    if rows == 6 and width == 2 * L:
        finish_block(c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51,
                     scale, bias, col, rf, has_residual, relu, of, o, K, L)
    else:
        store_block(tf, L, c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51)
        finish_tile(tf, rows, width, 2 * L, scale, bias, col, rf, has_residual, relu, of, o, K)


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
    residual, ReLU) in registers on its way out: the only pass over the output. A last block of fewer
    than 6 rows repeats its last row (one loop for every block, each row read from its own start, as in
    conv_packed; it ran the GEMMs of resnet50's 1x1 layers in 0.93-0.96x the time of a row-by-row loop
    for the remainder: bench/results/notes.md); it and a last, partial panel go through tile (6, NR)
    and are finished element by element, the repeated rows dropped.
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
    tf = flat(tile)
    group = max(1, (1 << 18) // (D * NR * a.itemsize))  # panels whose weights fit in L2 together
    af = flat(a)
    wf = flat(Wp)
    of = flat(out)
    rf = flat(residual)
    panels = Wp.shape[1]
    for e in range(E):
        a0 = e * M * D  # a[e], Wp[e], out[e] and residual[e] in the flat arrays
        o0 = e * M * K
        for g_lo in range(p_lo, p_hi, group):
            for i0 in range(0, M, 6):
                rows = min(6, M - i0)
                # The six rows' starts in af; a last block of fewer repeats its last row and keeps only its own.
                x0 = a0 + i0 * D
                x1 = a0 + (i0 + min(1, rows - 1)) * D
                x2 = a0 + (i0 + min(2, rows - 1)) * D
                x3 = a0 + (i0 + min(3, rows - 1)) * D
                x4 = a0 + (i0 + min(4, rows - 1)) * D
                x5 = a0 + (i0 + min(5, rows - 1)) * D
                for p in range(g_lo, min(g_lo + group, p_hi)):
                    w = (e * panels + p) * D * NR
                    col = p * NR
                    width = min(NR, K - col)
                    c00 = simd_zero(a)
                    c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = c00
                    for k in range(D):
                        c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51 = fma_step(
                            c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51,
                            af, x0 + k, x1 + k, x2 + k, x3 + k, x4 + k, x5 + k, wf, w, L)
                        w += NR
                    finish(c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51,
                           rows, width, tf, scale, bias, col, rf, has_residual, relu, of, o0 + i0 * K + col, K, L)


@njit(inline="always")
def next_pixel(n, p, q, P, Q, step):
    """The output pixel after (n, p, q) in row-major order where step, else (n, p, q) itself (a last block
    of fewer than six repeats its last pixel)."""
    if not step:
        return n, p, q
    q += 1
    if q == Q:
        q = 0
        p += 1
        if p == P:
            p = 0
            n += 1
    return n, p, q


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
    xf = flat(xp)
    wf = flat(Wp)
    of = flat(out)
    rf = flat(residual)
    tf = flat(tile)
    row = Wq * C
    group = max(1, (1 << 18) // (D * NR * xp.itemsize))
    for g_lo in range(p_lo, p_hi, group):
        for i0 in range(m_lo, m_hi, 6):
            rows = min(6, m_hi - i0)
            # Where each of the six windows starts in xf: the first pixel's (image, row, column) divided out, the others
            # stepped from it (divisions for each cost the stem, whose windows are short, a fifth of its time).
            img, pr, pc = i0 // (P * Q), (i0 // Q) % P, i0 % Q
            x0 = ((img * Hp + pr * stride) * Wq + pc * stride) * C
            img, pr, pc = next_pixel(img, pr, pc, P, Q, rows > 1)
            x1 = ((img * Hp + pr * stride) * Wq + pc * stride) * C
            img, pr, pc = next_pixel(img, pr, pc, P, Q, rows > 2)
            x2 = ((img * Hp + pr * stride) * Wq + pc * stride) * C
            img, pr, pc = next_pixel(img, pr, pc, P, Q, rows > 3)
            x3 = ((img * Hp + pr * stride) * Wq + pc * stride) * C
            img, pr, pc = next_pixel(img, pr, pc, P, Q, rows > 4)
            x4 = ((img * Hp + pr * stride) * Wq + pc * stride) * C
            img, pr, pc = next_pixel(img, pr, pc, P, Q, rows > 5)
            x5 = ((img * Hp + pr * stride) * Wq + pc * stride) * C
            for p in range(g_lo, min(g_lo + group, p_hi)):
                w = p * D * NR
                col = p * NR
                width = min(NR, K - col)
                c00 = simd_zero(xp)
                c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = c00
                for r in range(R):
                    shift = r * row
                    for j in range(shift, shift + run):
                        c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51 = fma_step(
                            c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51,
                            xf, x0 + j, x1 + j, x2 + j, x3 + j, x4 + j, x5 + j, wf, w, L)
                        w += NR
                finish(c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51,
                       rows, width, tf, scale, bias, col, rf, has_residual, relu, of, i0 * K + col, K, L)


@kernel(nogil=True)
def pad_into(x, pad, r_lo, r_hi, xp):
    """Rows r_lo <= r < r_hi of xp (N, H + 2 pad, W + 2 pad, C), counted over all images, from x (N, H, W, C)
    with `pad` zeros around each map (conv_packed's input)."""
    N, H, W, C = x.shape
    Hp = H + 2 * pad
    row = (W + 2 * pad) * C
    xf = flat(x)
    pf = flat(xp)
    for r in range(r_lo, r_hi):
        n, h = r // Hp, r % Hp
        o = r * row
        if h < pad or h >= H + pad:
            fill_zeros(pf, o, row)
            continue
        fill_zeros(pf, o, pad * C)
        fill_zeros(pf, o + row - pad * C, pad * C)
        copy_run(xf, (n * H + h - pad) * W * C, pf, o + pad * C, W * C)


@njit(inline="always")
def copy_run(src, i, dst, o, n):
    """dst[o : o + n] = src[i : i + n] of flat arrays, a vector at a time (a scalar loop is not vectorised:
    numba's negative-index wraparound), the remainder one by one."""
    L = simd_lanes(dst)
    k = 0
    while k + L <= n:
        simd_store(dst, o + k, simd_load(src, i + k))
        k += L
    while k < n:
        dst[o + k] = src[i + k]
        k += 1


@njit(inline="always")
def fill_zeros(dst, o, n):
    """dst[o : o + n] = 0 of a flat array, a vector at a time."""
    L = simd_lanes(dst)
    zero = simd_zero(dst)
    k = 0
    while k + L <= n:
        simd_store(dst, o + k, zero)
        k += L
    while k < n:
        dst[o + k] = 0
        k += 1


@kernel(nogil=True)
def im2col(x, R, S, stride, padding, P, Q, job_lo, job_hi, cols):
    """Output rows job_lo <= (n, p) < job_hi of x (N, H, W, C) -> cols (G, (job_hi-job_lo)*Q, R*S*C/G).

    Column order (r, s, c), zero padded. Serial and GIL-free: each thread of the
    backend's pool gathers its own chunk just before multiplying it.
    """
    N, H, W, C = x.shape
    G = cols.shape[0]
    Cg = C // G
    xf = flat(x)
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
                            dst[start + i] = xf[src + i]
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


@njit(inline="always")
def gather_tile(x, n, h0, w0, size, d):
    """d[:size, :size] = the size x size patch of image n of x (N, H, W, C) at (h0, w0), zeros outside x:
    a Winograd tile of the input (winograd_input) or of an output gradient (train.winograd_grad_output)."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    for a in range(size):
        h = h0 + a
        for b in range(size):
            w = w0 + b
            if 0 <= h < H and 0 <= w < W:
                for c in range(C):
                    d[a, b, c] = x[n, h, w, c]
            else:
                for c in range(C):
                    d[a, b, c] = 0


@kernel(nogil=True)
def winograd_input(x, m, t_lo, t_hi, work, V):
    """x (N, H, W, C) -> V (A*A, t_hi-t_lo, C) = B^T d B for tiles t_lo <= t < t_hi, m = 4 or 2.
    work: scratch (2, A, A, C).

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
    d, tmp = work[0], work[1]  # (A, A, C) each
    for t in range(t_lo, t_hi):
        n = t // (th * tw)
        i = (t // tw) % th
        j = t % tw
        u = t - t_lo
        gather_tile(x, n, i * m - 1, j * m - 1, A, d)
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
def winograd_output(Mt, m, bias, residual, has_residual, relu, t_lo, t_hi, tmp, y, out):
    """Mt (A*A, t_hi-t_lo, K) -> out (N, P, Q, K) = [relu](A^T M A + bias [+ residual]) for
    tiles t_lo <= t < t_hi, clipped at the edge. A^T (WINOGRAD[m][2]) written out term by term,
    as in winograd_input. Scratch: tmp (m, A, K), y (m, m, K). Serial and GIL-free, as winograd_input."""
    N, P, Q, K = out.shape
    th = (P + m - 1) // m
    tw = (Q + m - 1) // m
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
    padding 1 (never wins), NaN propagates. Each output pixel's channels a vector at a time (as scalar
    loops, numba's wraparound kept them from being vectorised: 4-5x slower, bench/results/notes.md),
    starting from the window's first element inside the map, then the others in row-major order.
    Serial and GIL-free: each pool thread pools its own rows (a parallel numba loop would load numba's
    threading layer and compile parfors: seconds of start-up)."""
    N, H, W, C = x.shape
    _, P, Q, _ = out.shape
    xf = flat(x)
    of = flat(out)
    L = simd_lanes(x)
    for job in range(job_lo, job_hi):
        n = job // P
        p = job % P
        h0, h1 = max(2 * p - 1, 0), min(2 * p + 2, H)
        for q in range(Q):
            w0, w1 = max(2 * q - 1, 0), min(2 * q + 2, W)
            o = ((n * P + p) * Q + q) * C
            first = ((n * H + h0) * W + w0) * C
            c = 0
            while c + L <= C:
                acc = simd_load(xf, first + c)
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        if h != h0 or w != w0:
                            acc = simd_max_nan(acc, simd_load(xf, ((n * H + h) * W + w) * C + c))
                simd_store(of, o + c, acc)
                c += L
            while c < C:
                best = xf[first + c]
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        v = xf[((n * H + h) * W + w) * C + c]
                        if v > best or v != v:
                            best = v
                of[o + c] = best
                c += 1


@kernel(nogil=True)
def mean_pool(x, n_lo, n_hi, out):
    """out (N, C) = the mean of x (N, H, W, C) over H and W, images n_lo <= n < n_hi: each channel's sum
    in pixel order (a vector of channels at a time), then divided by H * W."""
    N, H, W, C = x.shape
    xf = flat(x)
    of = flat(out)
    L = simd_lanes(x)
    HW = H * W
    for n in range(n_lo, n_hi):
        c = 0
        while c + L <= C:
            acc = simd_zero(x)
            for p in range(HW):
                acc = simd_add(acc, simd_load(xf, (n * HW + p) * C + c))
            simd_store(of, n * C + c, acc)
            c += L
        while c < C:  # summed in out's dtype, as the vectors are
            of[n * C + c] = 0
            for p in range(HW):
                of[n * C + c] += xf[(n * HW + p) * C + c]
            c += 1
        for c in range(C):
            of[n * C + c] /= HW


# --- numba's JIT: the training ops' kernels, and any the ahead-of-time build cannot serve -------------


class _CompileNotice(event.Listener):
    """Says (announce COMPILING) when numba starts compiling one of our dispatchers; numba announces
    only real compilations ("numba:compile"), not loads from its cache."""

    def __init__(self):
        self.dispatchers: set[int] = set()
        event.register("numba:compile", self)

    def on_start(self, ev):
        if id(ev.data["dispatcher"]) in self.dispatchers:
            announce(COMPILING, numba.config.CACHE_DIR or kernel_cache_dir())

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
    """
    with scipy_hidden_from_numba():  # numba's CPU target imports arraymath at the first call; here, without SciPy
        importlib.import_module("numba.np.arraymath")
    with _our_cache_dir():
        kernels = {name: njit(cache=True, **options)(f) for name, (f, options) in _KERNELS[module].items()}
    _compile_notice().dispatchers.update(id(d) for d in kernels.values())
    return SimpleNamespace(**kernels)
