"""The NumPy reference ops: pure functions over NCHW arrays.

This module is the specification every compiled kernel is tested against,
and it is itself tested against ``torch.nn.functional``. Each op keeps the
dtype of its input (float32 stays float32, float64 stays float64).

Each op used in training has its gradient right after it (``conv2d_backward``,
``batch_norm_train`` / ``batch_norm_backward``, ``relu_backward``, ...), with the
forward's names: given the gradient of the loss with respect to an op's output,
it returns the gradients with respect to the op's inputs and parameters. These
are tested against torch autograd (``tests/test_grad.py``).

Shape letters, used in every docstring and shape comment:
    N batch, C input channels, H x W input size,
    K output channels, R x S kernel size, P x Q output size, G groups.

What a backend's convolution computes is said once, here: ``conv2d_bias_act`` (a convolution
with its batch norm folded into a bias, then the residual add and the ReLU of a ResNet block),
built on ``conv2d``, whose meaning ``conv2d_loops`` spells out as the sum the papers write.
The NumPy backend runs ``conv2d_bias_act``; the Numba and CUDA kernels are tested against it.

Memory layout: every op takes (N, C, H, W) arrays whatever their strides. The convolutions
and pools keep their input's layout: an (N, C, H, W) array that lies in memory channel by
channel (a transposed view of a (C, N, H, W) array, ``to_channel_major``) gives outputs and
input gradients laid out the same way. That is the layout im2col's matrix product writes, so
the training pass (``autograd.py``) keeps its activations in it and never transposes them back
and forth; a C-contiguous input gives C-contiguous outputs, as before.

References: PyTorch's ``torch.nn.functional`` for semantics (and ATen's CPU
kernels for batch norm's running-statistic update and max pooling's tie rule);
CS231n's ``layers.py`` for the im2col formulation of convolution and its backward;
llm.c's reference ops (a plain loop form beside the fast one).
"""
from __future__ import annotations

import math

import numpy as np

BN_EPS = 1e-5


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling along one axis: floor((size + 2p - k) / s) + 1.

    The one place this formula is written: the ops, the kernels and the MAC count all use it.
    """
    return (size + 2 * padding - kernel) // stride + 1


def channel_major(x: np.ndarray) -> bool:
    """Whether x (N, C, H, W) lies in memory channel by channel: x.transpose(1, 0, 2, 3) is C-contiguous."""
    return x.transpose(1, 0, 2, 3).flags.c_contiguous


def to_channel_major(x: np.ndarray) -> np.ndarray:
    """x (N, C, H, W), the same values laid out channel by channel: a view of a C-contiguous (C, N, H, W) copy."""
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)


def patch_matrix(x: np.ndarray, R: int, S: int, stride: int, padding: int, groups: int) -> np.ndarray:
    """The im2col patches of every image side by side, for one matrix product per group.

    x: (N, C, H, W) -> (G, C/G*R*S, N*P*Q), contiguous: row (c, r, s) of group g, column
    (n, p, q) is x_padded[n, g*C/G + c, p*stride + r, q*stride + s].

    The patch matrix is R*S times the input, and gathering it costs about as long as the matrix
    product that reads it: it is written straight from x, one kernel offset (r, s) at a time, with
    zeros where a window hangs over the border (a padded copy of x first costs one more pass).
    """
    N, C, H, W = x.shape
    if R == 1 and S == 1 and padding == 0:
        # A 1x1 convolution reads each pixel once: the (strided) input is already the patch matrix.
        patches = x[:, :, ::stride, ::stride]  # (N, C, P, Q)
        P, Q = patches.shape[2:]
        return np.ascontiguousarray(patches.transpose(1, 0, 2, 3)).reshape(groups, C // groups, N * P * Q)
    if stride == 1 and R - 1 == 2 * padding == S - 1:
        return _same_size_patch_matrix(x, R, padding, groups)
    if stride > 1 and R * S >= 4 * stride * stride:
        return _phase_patch_matrix(x, R, S, stride, padding, groups)
    P = conv_output_size(H, R, stride, padding)
    Q = conv_output_size(W, S, stride, padding)
    cols = np.empty((C, R, S, N, P, Q), dtype=x.dtype)
    x_cnhw = x.transpose(1, 0, 2, 3)
    for r in range(R):
        p0, p1 = _inside(r, stride, padding, H, P)  # the output rows whose row offset r reads inside x
        h0 = p0 * stride + r - padding
        for s in range(S):
            q0, q1 = _inside(s, stride, padding, W, Q)
            w0 = q0 * stride + s - padding
            dst = cols[:, r, s]  # (C, N, P, Q)
            if (p0, p1, q0, q1) != (0, P, 0, Q):  # some windows hang over the border: zeros there
                dst[:, :, :p0] = 0
                dst[:, :, p1:] = 0
                dst[:, :, p0:p1, :q0] = 0
                dst[:, :, p0:p1, q1:] = 0
            if p0 < p1 and q0 < q1:
                dst[:, :, p0:p1, q0:q1] = x_cnhw[:, :, h0 : h0 + (p1 - p0 - 1) * stride + 1 : stride, w0 : w0 + (q1 - q0 - 1) * stride + 1 : stride]
    return cols.reshape(groups, C // groups * R * S, N * P * Q)


def _same_size_patch_matrix(x: np.ndarray, R: int, padding: int, groups: int) -> np.ndarray:
    """patch_matrix of a stride-1 R x R kernel that keeps the size (R = 2*padding + 1: P = H, Q = W).

    Offset (r, s) of output pixel j = p*W + q of a plane reads the plane's pixel j + shift, shift =
    (r - padding)*W + (s - padding), wherever p + r - padding and q + s - padding lie inside the image:
    so each offset is one shifted copy of every whole (n, c) plane, long contiguous runs where the
    row-by-row copy has runs of W (several times faster on 14x14 maps and smaller). Then zeros where
    the row falls outside (the start or end of the plane) or the column does (the copy wrapped around
    into the row before or after).
    """
    N, C, H, W = x.shape
    HW = H * W
    planes = x.transpose(1, 0, 2, 3).reshape(C, N, HW)  # a view for a channel-major x
    cols = np.empty((C, R, R, N, HW), dtype=x.dtype)
    for r in range(R):
        for s in range(R):
            shift = (r - padding) * W + (s - padding)
            j0 = min(HW, max(0, -shift))  # j0:j1: the pixels whose row lies inside, and a few wrapped
            j1 = max(j0, min(HW, HW - shift))
            dst = cols[:, r, s]  # (C, N, H*W)
            dst[:, :, :j0] = 0
            dst[:, :, j0:j1] = planes[:, :, j0 + shift : j1 + shift]
            dst[:, :, j1:] = 0
            q0, q1 = _inside(s, 1, padding, W, W)  # the columns whose offset s reads inside
            by_column = dst.reshape(C, N, H, W)
            by_column[..., :q0] = 0
            by_column[..., q1:] = 0
    return cols.reshape(groups, C // groups * R * R, N * HW)


def phase_length(size: int, stride: int, padding: int) -> int:
    """The rows (or columns) of each of stride_phases' phases: ceil((size + 2*padding) / stride)."""
    return -(-(size + 2 * padding) // stride)


def stride_phases(x: np.ndarray, stride: int, padding: int, fill: float, spare_rows: int = 0) -> np.ndarray:
    """x (..., H, W), padded by `padding` rows and columns of `fill` on every side, split into its
    stride x stride phases: (stride, stride, ..., Hp + spare_rows, Wp), Hp and Wp phase_length, phase
    (a, b) holding the padded rows a, a + stride, ... and columns b, b + stride, ..., then `spare_rows`
    rows of fill.

    Offset (r, s) of a stride-`stride` window at (p, q) is then pixel (p + r // stride, q + s // stride)
    of phase (r % stride, s % stride): the offset's pixels of all windows are a plain window of one
    phase, copied or compared in contiguous runs where x itself is read every stride-th element.
    """
    H, W = x.shape[-2:]
    Hp, Wp = phase_length(H, stride, padding), phase_length(W, stride, padding)
    phases = np.full((stride, stride, *x.shape[:-2], Hp + spare_rows, Wp), fill, dtype=x.dtype)
    for a in range(stride):
        i0, i1 = _inside(a, stride, padding, H, Hp)  # the phase rows that are pixels of x
        for b in range(stride):
            j0, j1 = _inside(b, stride, padding, W, Wp)
            if i0 < i1 and j0 < j1:
                h0, w0 = i0 * stride + a - padding, j0 * stride + b - padding
                phases[a, b, ..., i0:i1, j0:j1] = x[..., h0 : h0 + (i1 - i0 - 1) * stride + 1 : stride, w0 : w0 + (j1 - j0 - 1) * stride + 1 : stride]
    return phases


def _phase_patch_matrix(x: np.ndarray, R: int, S: int, stride: int, padding: int, groups: int) -> np.ndarray:
    """patch_matrix of a strided kernel much larger than its stride (the ImageNet stem's 7x7, stride 2).

    The zero-padded input is split once into its stride x stride phases (stride_phases); offset (r, s)
    of every window is then a plain window of one phase, copied in contiguous runs (twice as fast on
    the stem). The phases are the size of x, so for a 3x3 stride-2 kernel (patches 9/4 of x) they cost
    more than they save.
    """
    N, C, H, W = x.shape
    P, Q = conv_output_size(H, R, stride, padding), conv_output_size(W, S, stride, padding)
    phases = stride_phases(x.transpose(1, 0, 2, 3), stride, padding, 0)  # (stride, stride, C, N, Hp, Wp)
    cols = np.empty((C, R, S, N, P, Q), dtype=x.dtype)
    for r in range(R):
        for s in range(S):
            cols[:, r, s] = phases[r % stride, s % stride, :, :, r // stride : r // stride + P, s // stride : s // stride + Q]
    return cols.reshape(groups, C // groups * R * S, N * P * Q)


def _inside(r: int, stride: int, padding: int, size: int, out_size: int) -> tuple[int, int]:
    """The outputs p0:p1 whose kernel offset r reads inside the input (p*stride + r - padding in 0:size)."""
    p0 = min(out_size, max(0, -(-(padding - r) // stride)))
    p1 = max(p0, min(out_size, (size - 1 + padding - r) // stride + 1))
    return p0, p1


def col2im(cols: np.ndarray, H: int, W: int, stride: int, padding: int) -> np.ndarray:
    """The adjoint of patch_matrix: add every patch column back onto the input pixel it was read from.

    cols: (C, R, S, N, P, Q), patch_matrix's layout -> (N, C, H, W), a transposed view of the
    channel-major sums (the caller copies it where it stores it). One strided addition per
    kernel offset (r, s): within one offset, distinct output positions read distinct pixels.
    """
    C, R, S, N, P, Q = cols.shape
    if R == 1 and S == 1 and padding == 0 and stride == 1:
        return cols.reshape(C, N, H, W).transpose(1, 0, 2, 3)
    out = np.zeros((C, N, H + 2 * padding, W + 2 * padding), dtype=cols.dtype)
    for r in range(R):
        for s in range(S):
            out[:, :, r : r + stride * (P - 1) + 1 : stride, s : s + stride * (Q - 1) + 1 : stride] += cols[:, r, s]
    return out[:, :, padding : padding + H, padding : padding + W].transpose(1, 0, 2, 3)


# conv2d and conv2d_backward take a few images at a time: one chunk's patch matrix stays
# near 2**23 elements (32 MB in float32), whatever the batch size.
CONV_CHUNK_ELEMENTS = 1 << 23


def image_chunks(N: int, elements_per_image: int) -> list[tuple[int, int]]:
    """The spans n0:n1 of N images taken together, so that their patch matrix (elements_per_image
    each) stays near CONV_CHUNK_ELEMENTS."""
    chunk = max(1, CONV_CHUNK_ELEMENTS // elements_per_image)
    return [(n0, min(N, n0 + chunk)) for n0 in range(0, max(N, 1), chunk)]  # no images: one empty span


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

    One matrix product per group: weight (G, K/G, C/G*R*S) times the patch matrix
    (G, C/G*R*S, N*P*Q) of all images side by side (a few images at a time, so that
    one chunk's patch matrix stays near CONV_CHUNK_ELEMENTS). The product is the output
    channel by channel: kept so for a channel-major x, copied to C order otherwise.
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
    w = weight.reshape(G, K // G, C_per_group * R * S)
    chunks = image_chunks(N, C * R * S * P * Q)
    if len(chunks) == 1:
        cols = patch_matrix(x, R, S, stride, padding, G)  # (G, C/G*R*S, N*P*Q)
        out = np.matmul(w, cols).reshape(K, N, P, Q).transpose(1, 0, 2, 3)  # (N, K, P, Q), channel-major
        if not channel_major(x):
            out = np.ascontiguousarray(out)
    else:
        out = np.empty_like(x, shape=(N, K, P, Q), dtype=np.result_type(x, weight))  # x's layout
        for n0, n1 in chunks:
            cols = patch_matrix(x[n0:n1], R, S, stride, padding, G)  # (G, C/G*R*S, n*P*Q)
            out[n0:n1] = np.matmul(w, cols).reshape(K, n1 - n0, P, Q).transpose(1, 0, 2, 3)
    if bias is not None:
        out += bias.reshape(1, K, 1, 1)
    return out


def conv2d_loops(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
) -> np.ndarray:
    """conv2d written as its definition, one output at a time (slow: a specification, for tests).

        out[n, k, p, q] = bias[k] + sum over c < C/G, r < R, s < S of
                          weight[k, c, r, s] * x[n, g*C/G + c, p*stride + r - padding, q*stride + s - padding]

    with g = k // (K/G) the group of output channel k, and x taken as 0 outside the image.
    """
    N, C, H, W = x.shape
    K, C_per_group, R, S = weight.shape
    P, Q = conv_output_size(H, R, stride, padding), conv_output_size(W, S, stride, padding)
    out = np.zeros((N, K, P, Q), dtype=np.result_type(x, weight))
    for n in range(N):
        for k in range(K):
            g = k // (K // groups)
            for p in range(P):
                for q in range(Q):
                    total = bias[k] if bias is not None else 0
                    for c in range(C_per_group):
                        for r in range(R):
                            h = p * stride + r - padding
                            for s in range(S):
                                w = q * stride + s - padding
                                if 0 <= h < H and 0 <= w < W:
                                    total += weight[k, c, r, s] * x[n, g * C_per_group + c, h, w]
                    out[n, k, p, q] = total
    return out


def conv2d_bias_act(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    residual: np.ndarray | None = None,
    relu: bool = False,
) -> np.ndarray:
    """What every backend's convolution computes: conv2d(x) + bias [+ residual], then [ReLU].

    x: (N, C, H, W); weight: (K, C/G, R, S), a convolution with its batch norm folded in
    (``fold_batch_norm``); bias: (K,); residual: (N, K, P, Q) or None. Returns (N, K, P, Q).
    In a ResNet block the last convolution takes the identity path as its residual, then the ReLU.
    """
    out = conv2d(x, weight, bias, stride=stride, padding=padding, groups=groups)  # (N, K, P, Q)
    if residual is not None:
        out += residual
    if relu:
        np.maximum(out, 0, out=out)  # relu in place (NaN stays NaN)
    return out


def conv2d_backward(
    grad_out: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    input_grad: bool = True,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Gradients of conv2d (no bias) with respect to its input and its weight.

    grad_out: (N, K, P, Q), the gradient of the loss with respect to conv2d(x, weight);
    x: (N, C, H, W); weight: (K, C/G, R, S).
    Returns (grad_x (N, C, H, W) or None when input_grad is False, grad_weight (K, C/G, R, S)).

    The forward is out[g] = w[g] @ cols[g] with the patches of all images side by side
    (cols: (G, C/G*R*S, N*P*Q)), so grad_w[g] = grad_out[g] @ cols[g]^T, one matrix product
    over every image and position at once, and grad_cols[g] = w[g]^T @ grad_out[g], which
    col2im adds back onto the pixels each column was read from (with stride 1 and a square kernel
    larger than 1x1, _conv2d_backward_stride1 does both from the patches of grad_out instead).
    Images go in chunks so that only one chunk's patch matrix exists at a time. grad_x has x's
    memory layout; for a channel-major grad_out, the gradient's matrix products read and write
    channel-major arrays with no transposing copy.
    """
    N, C, H, W = x.shape
    K, C_per_group, R, S = weight.shape
    G = groups
    P, Q = grad_out.shape[2:]
    if input_grad and stride == 1 and R == S > 1 and padding <= R - 1:
        return _conv2d_backward_stride1(grad_out, x, weight, padding, groups)
    w_t = weight.reshape(G, K // G, C_per_group * R * S).transpose(0, 2, 1)  # (G, C/G*R*S, K/G)
    # grad_w = go @ cols^T, or its transpose cols @ go^T: OpenBLAS runs the latter several times faster
    # when K/G is small (64 rows against 25088-long columns: 8x on AVX2), but from K/G = 256 up the
    # two take as long, and transposing the result back costs as much again (512 x 4608: 11 ms).
    transposed = K // G < 256
    grad_w = None  # the sum over the chunks: (G, C/G*R*S, K/G) if transposed else (G, K/G, C/G*R*S)
    grad_x = np.empty_like(x) if input_grad else None  # in x's layout
    chunks = image_chunks(N, C * R * S * P * Q)
    for n0, n1 in chunks:
        n = n1 - n0
        go = grad_out[n0:n1].transpose(1, 0, 2, 3).reshape(G, K // G, n * P * Q)  # a view if channel-major (BLAS takes its row stride)
        cols = patch_matrix(x[n0:n1], R, S, stride, padding, G)  # (G, C/G*R*S, n*P*Q)
        if transposed:
            grad_w = _sum_into(grad_w, np.matmul(cols, go.transpose(0, 2, 1)))  # (G, C/G*R*S, K/G)
        else:
            grad_w = _sum_into(grad_w, np.matmul(go, cols.transpose(0, 2, 1)))  # (G, K/G, C/G*R*S)
        del cols
        if input_grad:
            grad_cols = np.matmul(w_t, go).reshape(C, R, S, n, P, Q)
            grad_x = _into(grad_x, n0, n1, col2im(grad_cols, H, W, stride, padding), len(chunks) == 1)
    if transposed:
        grad_w = np.ascontiguousarray(grad_w.transpose(0, 2, 1))
    return grad_x, grad_w.reshape(weight.shape)


def _conv2d_backward_stride1(
    grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray, padding: int, groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """conv2d_backward for stride 1 and a square R x R kernel, R > 1, padding <= R - 1: both gradients
    from one patch matrix, that of grad_out.

    With stride 1 the input's gradient is the full convolution of grad_out with the kernel flipped and
    each group's in/out channels swapped (flipped_kernel), padding R-1-padding: grad_x[g] = flipped[g] @
    gcols[g], gcols (G, K/G*R*R, N*H*W) the patches of grad_out (row (k, r', s') of group g, column
    (n, h, w) is grad_out_padded[n, g*K/G + k, h + r', w + s']). The same patches give the weight's
    gradient: grad_w[k, c, r, s] = sum over (n, h, w) of x[n, c, h, w] * gcols[(k, R-1-r, R-1-s), (n, h, w)],
    i.e. gcols[g] @ x[g]^T with x channel-major, turned back. One R*R-times-larger copy (of grad_out)
    where patches of grad_out and of x took two; a dense product with inner length K/G*R*R and a
    patch copy also cost less than w^T @ grad_out (inner length K/G) and R*R col2im passes.
    """
    N, C, H, W = x.shape
    K, C_per_group, R, _ = weight.shape
    G = groups
    flipped = flipped_kernel(weight, G).reshape(G, C_per_group, K // G * R * R)  # (G, C/G, K/G*R*R)
    grad_w_turned = None  # (G, K/G*R*R, C/G), rows (k, R-1-r, R-1-s): the sum over the chunks
    grad_x = np.empty_like(x)  # in x's layout
    chunks = image_chunks(N, K * R * R * H * W)
    for n0, n1 in chunks:
        n = n1 - n0
        gcols = patch_matrix(grad_out[n0:n1], R, R, 1, R - 1 - padding, G)  # (G, K/G*R*R, n*H*W)
        grad_x = _into(grad_x, n0, n1, np.matmul(flipped, gcols).reshape(C, n, H, W).transpose(1, 0, 2, 3), len(chunks) == 1)
        x_cm = x[n0:n1].transpose(1, 0, 2, 3).reshape(G, C_per_group, n * H * W)  # a view if x is channel-major
        grad_w_turned = _sum_into(grad_w_turned, np.matmul(gcols, x_cm.transpose(0, 2, 1)))  # (G, K/G*R*R, C/G)
        del gcols, x_cm
    grad_w = grad_w_turned.reshape(G, K // G, R, R, C_per_group)[:, :, ::-1, ::-1].transpose(0, 1, 4, 2, 3)
    return grad_x, np.ascontiguousarray(grad_w).reshape(weight.shape)


def _sum_into(total: np.ndarray | None, part: np.ndarray) -> np.ndarray:
    """total + part in total's memory; part itself for the first chunk (with one chunk, the gradient
    is the product: no zeroed array first, no addition)."""
    if total is None:
        return part
    total += part
    return total


def _into(grad_x: np.ndarray, n0: int, n1: int, chunk: np.ndarray, whole: bool) -> np.ndarray:
    """grad_x with images n0:n1 set to chunk; when the chunk is every image and already in
    grad_x's layout (a channel-major matrix product for a channel-major x), the chunk itself."""
    if whole and chunk.strides == grad_x.strides:
        return chunk
    grad_x[n0:n1] = chunk
    return grad_x


def flipped_kernel(weight: np.ndarray, groups: int = 1) -> np.ndarray:
    """The kernel of conv2d's adjoint (the transposed convolution): (K, C/G, R, S) -> (C, K/G, R, S).

    Within each group input and output channels swap and the R x S window turns half a circle:
    flipped[g*C/G + c, k, r, s] = weight[g*K/G + k, c, R-1-r, S-1-s]. With stride 1,
    conv2d(grad_out, flipped, padding=R-1-padding, groups) is the gradient with respect to conv2d's input.
    With groups 1 a view of weight (no copy: a consumer that reads it once gathers it itself), else a copy.
    """
    K, C_per_group, R, S = weight.shape
    G = groups
    per_group = weight.reshape(G, K // G, C_per_group, R, S).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]  # (G, C/G, K/G, R, S)
    if G == 1:
        return per_group[0]
    return np.ascontiguousarray(per_group).reshape(G * C_per_group, K // G, R, S)


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


def channel_sums(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """Per-channel sums over (N, H, W) of x, or of x * y: (C,) in float64.

    Each image's channel is summed in x's dtype (one contiguous row: NumPy's pairwise sum, or
    BLAS's dot product for x * y, with no temporary), then the N partial sums in float64. Casting
    every element to float64 first costs three times as long. The dot product must be BLAS's,
    whose many partial sums keep float32 rounding small: einsum's float32 sum of products moved a
    five-step fine-tuning run's loss 3e-5 from torch's float64 one (BLAS's: 1e-7, as float64 sums).
    """
    N, C = x.shape[:2]
    rows = x.reshape(N, C, -1)
    if y is None:
        partial = rows.sum(axis=2)  # (N, C)
    else:
        partial = np.matmul(rows[:, :, None, :], y.reshape(N, C, -1, 1))[:, :, 0, 0]  # (N, C): a dot product per row
    return partial.sum(axis=0, dtype=np.float64)


# Batch norm in training mode reads and writes its input several times over (the mean, the centring,
# the variance, the scaling, the output; the backward likewise): it takes the channels a block at a
# time, a block near 2**19 elements (2 MB in float32), so that the later passes find it in the cache.
BN_BLOCK_ELEMENTS = 1 << 19


def channel_blocks(x: np.ndarray) -> list[tuple[int, int]]:
    """The spans c0:c1 of x's (N, C, H, W) channels taken together, near BN_BLOCK_ELEMENTS each."""
    N, C, H, W = x.shape
    block = max(1, BN_BLOCK_ELEMENTS // max(1, N * H * W))
    return [(c0, min(C, c0 + block)) for c0 in range(0, C, block)]


def batch_norm_train(
    x: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray,
    bias: np.ndarray,
    momentum: float = 0.1,
    eps: float = BN_EPS,
    inplace: bool = False,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, bool]]:
    """Batch norm in training mode, as ``torch.nn.functional.batch_norm(training=True)``.

    x: (N, C, H, W); the parameters: (C,). Normalises with the batch's own mean and
    biased variance over (N, H, W), then updates running_mean and running_var in place
    (when given): running = (1 - momentum) * running + momentum * batch statistic, with
    the unbiased variance (times M / (M - 1), M = N*H*W), as torch does.
    Returns (out (N, C, H, W), saved) where saved = (x_hat, inv_std, True) is what
    batch_norm_backward needs. The variance is summed over the centred values (channel_sums),
    never as E[x^2] - E[x]^2, which cancels catastrophically on a channel far from zero.
    inplace=True turns x itself into the saved x_hat (the training pass does not read it again).
    The channels go a block at a time (channel_blocks): each channel's statistics are its own.
    """
    shape = (1, -1, 1, 1)
    N, C, H, W = x.shape
    M = N * H * W
    if M < 2:
        raise ValueError(f"batch norm in training mode needs more than 1 value per channel, got input {x.shape} (as in torch)")
    x_hat = x if inplace else np.empty_like(x)
    out = np.empty_like(x)
    mean, var = np.empty(C), np.empty(C)  # float64, as channel_sums
    inv_std = np.empty(C, dtype=x.dtype)
    for c0, c1 in channel_blocks(x):
        block, xh = x[:, c0:c1], x_hat[:, c0:c1]
        mean[c0:c1] = channel_sums(block) / M
        np.subtract(block, mean[c0:c1].astype(x.dtype).reshape(shape), out=xh)  # centred
        var[c0:c1] = channel_sums(xh, xh) / M  # biased
        inv_std[c0:c1] = 1.0 / np.sqrt(var[c0:c1] + eps)
        xh *= inv_std[c0:c1].reshape(shape)
        np.multiply(xh, weight[c0:c1].astype(x.dtype).reshape(shape), out=out[:, c0:c1])
        out[:, c0:c1] += bias[c0:c1].astype(x.dtype).reshape(shape)
    if running_mean is not None:
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
    if running_var is not None:
        unbiased = var * M / (M - 1)
        running_var[...] = (1 - momentum) * running_var + momentum * unbiased
    return out, (x_hat, inv_std, True)


def batch_norm_eval(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    eps: float = BN_EPS,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, bool]]:
    """Batch norm in inference mode (as ``batch_norm``), keeping what its backward needs.

    x: (N, C, H, W) -> (out (N, C, H, W), saved = (x_hat, inv_std, False)).
    """
    shape = (1, -1, 1, 1)
    inv_std = (1.0 / np.sqrt(running_var.astype(np.float64) + eps)).astype(x.dtype)
    x_hat = x - running_mean.astype(x.dtype).reshape(shape)
    x_hat *= inv_std.reshape(shape)
    out = x_hat * weight.astype(x.dtype).reshape(shape)
    out += bias.astype(x.dtype).reshape(shape)
    return out, (x_hat, inv_std, False)


def batch_norm_backward(
    grad_out: np.ndarray, saved: tuple[np.ndarray, np.ndarray, bool], weight: np.ndarray, inplace: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of batch_norm_train or batch_norm_eval: (grad_x, grad_weight, grad_bias).

    grad_out: (N, C, H, W); saved: the forward's (x_hat, inv_std, training); weight: (C,).
    With out = x_hat * weight + bias: grad_bias = sum(grad_out), grad_weight = sum(grad_out * x_hat)
    over (N, H, W). In inference mode x_hat is affine in x: grad_x = grad_out * weight * inv_std.
    In training mode the batch mean and variance depend on x too, which subtracts the
    gradient's projection on the constant and on x_hat:
    grad_x = weight * inv_std * (grad_out - mean(grad_out) - x_hat * mean(grad_out * x_hat)).
    inplace=True writes grad_x over the saved x_hat (the training pass does not read it again).
    """
    x_hat, inv_std, training = saved
    shape = (1, -1, 1, 1)
    dtype = grad_out.dtype
    N, C, H, W = grad_out.shape
    M = N * H * W
    grad_x = x_hat if inplace else np.empty_like(x_hat)
    grad_weight, grad_bias = np.empty(C), np.empty(C)  # float64, as channel_sums
    scale = (weight.astype(np.float64) * inv_std).astype(dtype).reshape(shape)
    for c0, c1 in channel_blocks(grad_out):  # each channel's sums are its own
        go, xh, gx = grad_out[:, c0:c1], x_hat[:, c0:c1], grad_x[:, c0:c1]
        grad_bias[c0:c1] = channel_sums(go)
        grad_weight[c0:c1] = channel_sums(go, xh)
        if training:
            np.multiply(xh, (-grad_weight[c0:c1] / M).astype(dtype).reshape(shape), out=gx)
            gx += go
            gx -= (grad_bias[c0:c1] / M).astype(dtype).reshape(shape)
            gx *= scale[:, c0:c1]
        else:
            np.multiply(go, scale[:, c0:c1], out=gx)
    return grad_x, grad_weight.astype(dtype), grad_bias.astype(dtype)


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


def relu_backward(grad_out: np.ndarray, out: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Gradient of relu given its output: grad_out where out > 0, else 0 (torch's threshold_backward).

    grad_out, out: same shape. inplace=True overwrites grad_out. A multiplication by the mask
    (several times faster than a masked copy), so a NaN or infinite grad_out where out <= 0
    gives NaN, where torch gives 0.
    """
    return np.multiply(grad_out, out > 0, out=grad_out if inplace else None)


# max_pool2d_with_indices takes (n, c) planes a block at a time: a block's phases near 2**18
# elements (1 MB in float32), so that they stay in the cache while all nine offsets read them.
POOL_BLOCK_ELEMENTS = 1 << 18


def _pool_output_size(H: int, W: int, kernel_size: int, stride: int, padding: int) -> tuple[int, int]:
    """(P, Q) of a max pool over an H x W input, or ValueError where torch refuses the pool."""
    if padding > kernel_size // 2:
        raise ValueError("max_pool2d: padding must be at most half the kernel size (as in torch)")
    P = conv_output_size(H, kernel_size, stride, padding)
    Q = conv_output_size(W, kernel_size, stride, padding)
    if P < 1 or Q < 1:
        raise ValueError(f"max_pool2d: input {H}x{W} is too small for a {kernel_size}x{kernel_size} window")
    return P, Q


def max_pool2d(x: np.ndarray, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> np.ndarray:
    """Max pooling, as ``torch.nn.functional.max_pool2d`` (floor mode).

    x: (N, C, H, W) -> (N, C, P, Q), P = floor((H + 2*padding - kernel_size) / stride) + 1.
    The padding is -inf so that it never wins the max, as in torch. The window's max is taken
    along its rows, then down its columns: 2k passes instead of k*k.
    """
    N, C, H, W = x.shape
    P, Q = _pool_output_size(H, W, kernel_size, stride, padding)
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=-np.inf)
    row_max = padded[:, :, :, 0 : stride * (Q - 1) + 1 : stride].copy()  # (N, C, Hp, Q)
    for s in range(1, kernel_size):
        np.maximum(row_max, padded[:, :, :, s : s + stride * (Q - 1) + 1 : stride], out=row_max)
    out = row_max[:, :, 0 : stride * (P - 1) + 1 : stride].copy()  # (N, C, P, Q)
    for r in range(1, kernel_size):
        np.maximum(out, row_max[:, :, r : r + stride * (P - 1) + 1 : stride], out=out)
    return out


def max_pool2d_with_indices(
    x: np.ndarray, kernel_size: int = 3, stride: int = 2, padding: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """max_pool2d and where each window's maximum lies, as ``torch.nn.functional.max_pool2d(return_indices=True)``.

    x: (N, C, H, W) -> (out (N, C, P, Q), indices (N, C, P, Q) int64), indices[n, c, p, q] = h*W + w,
    the position in x[n, c] of the element torch picks, which max_pool2d_backward sends the gradient to.
    As ATen's kernel: a window starts at its first element inside the image with maximum -inf,
    then moves, scanning row by row, to each element greater than the maximum or NaN (padding is
    never visited). So the first element in scan order that equals the window's maximum wins;
    where the maximum is NaN, the last NaN; where it is -inf, the first element inside the image.

    All windows scan at once, one kernel offset (r, s) at a time. The offset each window stands
    on is kept as a small integer and updated by arithmetic (winner += better * (offset - winner)),
    not by a masked write, which branches on every element of a random mask and runs several
    times slower. The work happens in the stride x stride phases of the input padded with -inf
    (stride_phases, as the stem's patches): the elements at offset (r, s) of all windows are then a
    plain slice of one phase, which NumPy's vector loops run several times faster than a stride-2
    view. The (n, c) planes go a block at a time, so that
    a block's phases are still in the cache when the nine offsets read them (from memory, the
    offset loop took twice as long). A channel-major x gives channel-major outputs.
    """
    if x.shape[0] > 1 and channel_major(x):  # each (n, c) plane pools alone: pool the (C, N, H, W) array
        out, indices = max_pool2d_with_indices(x.transpose(1, 0, 2, 3), kernel_size, stride, padding)
        return out.transpose(1, 0, 2, 3), indices.transpose(1, 0, 2, 3)
    N, C, H, W = x.shape
    P, Q = _pool_output_size(H, W, kernel_size, stride, padding)
    k = kernel_size
    Hp, Wp = phase_length(H, stride, padding), phase_length(W, stride, padding)

    # The windows are worked on a P x Wp grid, rows as long as a phase's, so that offset (r, s) of a
    # plane's windows is one contiguous run of a phase: P*Wp elements from the run's start (a slice of
    # P x Q windows has runs of Q, and NumPy's per-run overhead dominated). Columns Q and beyond are
    # scratch (the run reads on into the next row, or the spare -inf row) and are dropped at the end.
    offsets = [(r, s) for r in range(k) for s in range(k)]  # scan order
    runs = [(r % stride, s % stride, (r // stride) * Wp + s // stride) for r, s in offsets]  # (phase a, b, start)
    rows, cols = np.arange(P)[:, None] * stride - padding, np.arange(Wp)[None, :] * stride - padding  # window corners
    first_inside = np.full((P, Wp), len(offsets), dtype=np.uint8)
    for i in reversed(range(len(offsets))):
        r, s = offsets[i]
        first_inside[(rows + r >= 0) & (rows + r < H) & (cols + s >= 0) & (cols + s < W)] = i
    delta = np.array([r * W + s for r, s in offsets], dtype=np.int64)  # offset (r, s) from a window's corner
    with_nan = x.size > 0 and bool(np.isnan(x.max()))  # max propagates NaN: one pass, no temporary

    planes = x.reshape(N * C, H, W)
    out = np.empty((N * C, P, Q), dtype=x.dtype)
    indices = np.empty((N * C, P, Q), dtype=np.int64)
    block = max(1, POOL_BLOCK_ELEMENTS // (stride * stride * (Hp + 1) * Wp))
    for b0 in range(0, N * C, block):
        B = min(N * C, b0 + block) - b0
        phases = stride_phases(planes[b0 : b0 + B], stride, padding, -np.inf, spare_rows=1)  # never wins the max
        phases = phases.reshape(stride, stride, B, (Hp + 1) * Wp)
        winner = np.empty((B, P * Wp), dtype=np.uint8)  # the index into offsets each window stands on
        winner[...] = first_inside.reshape(-1)
        maximum = np.full((B, P * Wp), -np.inf, dtype=x.dtype)  # the maximum so far
        better = np.empty((B, P * Wp), dtype=bool)
        step = np.empty((B, P * Wp), dtype=np.uint8)
        for i, (a, b, start) in enumerate(runs):
            value = phases[a, b, :, start : start + P * Wp]  # offset i of every window of the block
            np.greater(value, maximum, out=better)
            if with_nan:
                better |= np.isnan(value)
            np.maximum(maximum, value, out=maximum)  # as the scan: a NaN stays
            np.subtract(i, winner, out=step)  # uint8, modulo 256: winner + step is i
            step *= better
            winner += step
        out[b0 : b0 + B] = maximum.reshape(B, P, Wp)[:, :, :Q]
        indices[b0 : b0 + B] = np.take(delta, winner.reshape(B, P, Wp)[:, :, :Q])
    indices += rows * W + cols[:, :Q]  # the corner h*W + w of each window
    return out.reshape(N, C, P, Q), indices.reshape(N, C, P, Q)


def max_pool2d_backward(grad_out: np.ndarray, indices: np.ndarray, input_shape: tuple[int, int, int, int]) -> np.ndarray:
    """Gradient of max pooling: each window's gradient goes to the element its index names.

    grad_out, indices: (N, C, P, Q), indices from max_pool2d_with_indices; input_shape: (N, C, H, W).
    Returns (N, C, H, W). Where windows overlap, an element collects the gradient of every window it
    won, added in window order as torch does (np.add.at, unbuffered); a NaN or inf gradient reaches
    its window's winner only. A channel-major grad_out and indices give a channel-major gradient.
    """
    N, C, H, W = input_shape
    if N > 1 and channel_major(grad_out) and channel_major(indices):  # per (n, c) plane, as the forward
        grad_t = max_pool2d_backward(grad_out.transpose(1, 0, 2, 3), indices.transpose(1, 0, 2, 3), (C, N, H, W))
        return grad_t.transpose(1, 0, 2, 3)
    grad_x = np.zeros((N * C, H * W), dtype=grad_out.dtype)
    flat = indices.reshape(N * C, -1) + (np.arange(N * C, dtype=np.int64) * (H * W))[:, None]  # into grad_x.ravel()
    np.add.at(grad_x.reshape(-1), flat.reshape(-1), grad_out.reshape(-1))
    return grad_x.reshape(N, C, H, W)


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


def adaptive_avg_pool2d_backward(grad_out: np.ndarray, input_shape: tuple[int, int, int, int]) -> np.ndarray:
    """Gradient of adaptive_avg_pool2d: each output's gradient spread evenly over the cells it averaged.

    grad_out: (N, C, P, Q); input_shape: (N, C, H, W). Returns (N, C, H, W).
    """
    N, C, H, W = input_shape
    P, Q = grad_out.shape[2:]
    if (P, Q) == (1, 1):
        return np.broadcast_to(grad_out / (H * W), (N, C, H, W)).copy()
    grad = np.zeros((N, C, H, W), dtype=grad_out.dtype)
    for i in range(P):
        h0, h1 = (i * H) // P, math.ceil((i + 1) * H / P)
        for j in range(Q):
            w0, w1 = (j * W) // Q, math.ceil((j + 1) * W / Q)
            grad[:, :, h0:h1, w0:w1] += (grad_out[:, :, i, j] / ((h1 - h0) * (w1 - w0)))[:, :, None, None]
    return grad


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x @ weight.T + bias, as ``torch.nn.functional.linear``.

    x: (N, C); weight: (K, C); bias: (K,) or None. Returns (N, K).
    """
    out = x @ weight.T
    if bias is not None:
        out += bias
    return out


def linear_backward(
    grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of linear: (grad_x (N, C), grad_weight (K, C), grad_bias (K,)).

    grad_out: (N, K); x: (N, C); weight: (K, C).
    """
    return grad_out @ weight, grad_out.T @ x, grad_out.sum(axis=0)


def cross_entropy(
    logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient, as ``torch.nn.functional.cross_entropy`` (mean reduction).

    logits: (N, K); labels: (N,) class indices. With label smoothing eps, each sample's
    loss is (1 - eps) * -log p[label] + eps * mean over classes of -log p, torch's definition
    (the target is (1 - eps) * one_hot + eps / K). Returns (loss as a float, grad_logits (N, K)):
    grad = (softmax(logits) - target) / N. Computed in float64, the gradient returned in
    the logits' dtype.
    """
    N, K = logits.shape
    labels = np.asarray(labels)
    if labels.shape != (N,) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be {N} integer class indices, got shape {labels.shape} dtype {labels.dtype}")
    if N and (labels.min() < 0 or labels.max() >= K):
        raise ValueError(f"labels must lie in [0, {K}), got values from {labels.min()} to {labels.max()}")
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # (N, K)
    target = np.full((N, K), label_smoothing / K)
    target[np.arange(N), labels] += 1.0 - label_smoothing
    loss = float(-(target * log_p).sum() / N)
    grad = (np.exp(log_p) - target) / N
    return loss, grad.astype(logits.dtype)


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
