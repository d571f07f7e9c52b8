"""The Numba training ops (kernels/train.py) against the NumPy reference ops, one op at a time.

Each op gets the reference's inputs in NHWC and must give the reference's outputs (in
float32 and float64); the whole numba training pass is checked against torch autograd in
test_grad.py. The convolution cases are test_kernels_cpu.py's table.
"""
import numpy as np
import pytest

from helpers import assert_close
from npresnet import functional as F
from test_kernels_cpu import CONV_CASES

DTYPES = [np.float32, np.float64]


@pytest.fixture(scope="module")
def train():
    pytest.importorskip("numba")
    from npresnet_kernels import train

    return train


@pytest.fixture(scope="module")
def ops(train):
    backend = train.StepBackend(threads=2)
    backend.MIN_TILES = 1
    ops = train.NumbaTrainingOps(backend)
    ops.winograd_min_size = 1  # Winograd (forward, input and weight gradients) even on the tiny maps of a test
    return ops


def nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def nchw(a):
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


def conv_inputs(case, dtype, seed=0):
    N, C, H, W, K, R, stride, padding, groups = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C // groups, R, R)).astype(dtype)
    out = F.conv2d(x, w, stride=stride, padding=padding, groups=groups)
    return x, w, rng.standard_normal(out.shape).astype(dtype), out


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d_and_backward(ops, name, dtype):
    case = CONV_CASES[name]
    stride, padding, groups = case[6:]
    x, w, grad_out, out = conv_inputs(case, dtype)
    assert_close(nchw(ops.conv2d(nhwc(x), w, stride, padding, groups)), out)
    want_x, want_w = F.conv2d_backward(grad_out, x, w, stride, padding, groups)
    got_x, got_w = ops.conv2d_backward(nhwc(grad_out), nhwc(x), w, stride, padding, groups)
    assert_close(nchw(got_x), want_x)
    assert_close(got_w, want_w)
    none, got_w = ops.conv2d_backward(nhwc(grad_out), nhwc(x), w, stride, padding, groups, input_grad=False)
    assert none is None
    assert_close(got_w, want_w)


@pytest.mark.parametrize("name", ["3x3_groups4_stride2", "1x1_stride2_odd", "3x3"])
def test_conv2d_backward_in_chunks_is_exact(ops, train, monkeypatch, name):
    """Small chunks (a few output rows each), shared between threads: integer-valued sums come out exact."""
    case = CONV_CASES[name]
    stride, padding, groups = case[6:]
    x, w, grad_out, _ = conv_inputs(case, np.float64, seed=1)
    x, w, grad_out = (np.round(a * 2) for a in (x, w, grad_out))
    monkeypatch.setattr(train, "CHUNK_BYTES", 1)
    monkeypatch.setattr(train, "WEIGHT_GRAD_CHUNK_BYTES", 1)
    monkeypatch.setattr(train, "WEIGHT_GRAD_MIN_ROWS", 1)
    monkeypatch.setattr(ops, "winograd_min_size", 10**6)  # the patches' GEMMs, not Winograd's
    want_x, want_w = F.conv2d_backward(grad_out, x, w, stride, padding, groups)
    got_x, got_w = ops.conv2d_backward(nhwc(grad_out), nhwc(x), w, stride, padding, groups)
    np.testing.assert_array_equal(got_w, want_w)
    if stride > 1:  # col2im: exact; stride 1 goes through the convolution of the flipped weights
        np.testing.assert_array_equal(nchw(got_x), want_x)
    else:
        assert_close(nchw(got_x), want_x)


WINOGRAD_CASES = [name for name, case in CONV_CASES.items() if case[5:] == (3, 1, 1, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("name", WINOGRAD_CASES)
def test_winograd_convolutions_with_either_tile(ops, monkeypatch, name, tile, dtype):
    """3x3 stride-1 forward, input and weight gradients by Winograd F(2x2) and F(4x4) (the training pass picks
    the tile by map size), odd sizes and maps smaller than a tile included."""
    monkeypatch.setattr(ops.backend, "winograd_tile4_min_size", 1 if tile == 4 else 10**6)
    x, w, grad_out, out = conv_inputs(CONV_CASES[name], dtype, seed=2)
    assert ops.backend.winograd_tile_for(*x.shape[2:]) == tile
    assert_close(nchw(ops.conv2d(nhwc(x), w, 1, 1, 1)), out)
    want_x, want_w = F.conv2d_backward(grad_out, x, w, 1, 1, 1)
    got_x, got_w = ops.conv2d_backward(nhwc(grad_out), nhwc(x), w, 1, 1, 1)
    assert_close(nchw(got_x), want_x)
    assert_close(got_w, want_w)


@pytest.mark.parametrize("threads", [1, 3])
def test_winograd_weight_grad_on_other_thread_counts(train, threads):
    """One thread makes both transforms in turn; three share two transforms and the tile positions."""
    backend = train.StepBackend(threads=threads)
    ops = train.NumbaTrainingOps(backend)
    ops.winograd_min_size = 1
    x, w, grad_out, _ = conv_inputs(CONV_CASES["3x3"], np.float64, seed=3)
    want_x, want_w = F.conv2d_backward(grad_out, x, w, 1, 1, 1)
    got_x, got_w = ops.conv2d_backward(nhwc(grad_out), nhwc(x), w, 1, 1, 1)
    assert_close(got_w, want_w)
    assert_close(nchw(got_x), want_x)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("flipped", [False, True], ids=["weights", "flipped-view"])
def test_step_conv_weights_match_the_inference_backends(ops, train, flipped, dtype):
    """StepConv packs its GEMM weights or (for Winograd, and then only those) makes its Winograd weights
    (both tiles) in its own kernels, from the weights or from the flipped, transposed view the input
    gradient uses: as cpu.PreparedConv does."""
    from npresnet.backends import FoldedConv
    from npresnet_kernels import cpu

    w = np.random.default_rng(6).standard_normal((20, 7, 3, 3)).astype(dtype)  # 20 channels: a partial panel
    if flipped:
        w = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
    conv = FoldedConv(w, np.zeros(w.shape[0], dtype=dtype), 1, 1, 1)
    want = cpu.PreparedConv(FoldedConv(np.ascontiguousarray(w), conv.bias, 1, 1, 1))
    np.testing.assert_array_equal(train.StepConv(conv, False, ops.backend).Wp, want.Wp)  # the GEMM path's
    got = train.StepConv(conv, True, ops.backend)
    assert got.Wp is None  # by Winograd: U only
    for tile in (2, 4):
        assert got.U(tile).shape == want.U(tile).shape
        assert_close(got.U(tile), want.U(tile))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_forward_backward_and_running_stats(ops, training, dtype):
    rng = np.random.default_rng(2)
    shape = (3, 5, 4, 7)  # N, C, H, W
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    mean, bias = (rng.standard_normal(5).astype(dtype) * 0.1 for _ in range(2))
    var, weight = (rng.uniform(0.5, 2, 5).astype(dtype) for _ in range(2))
    grad_out = rng.standard_normal(shape).astype(dtype)
    ref_mean, ref_var, got_mean, got_var = mean.copy(), var.copy(), mean.copy(), var.copy()
    if training:
        want, want_saved = F.batch_norm_train(x, ref_mean, ref_var, weight, bias, 0.1)
        got, got_saved = ops.batch_norm_train(nhwc(x), got_mean, got_var, weight, bias, 0.1)
    else:
        want, want_saved = F.batch_norm_eval(x, mean, var, weight, bias)
        got, got_saved = ops.batch_norm_eval(nhwc(x), mean, var, weight, bias)
    assert_close(nchw(got), want)
    assert_close(got_mean, ref_mean)
    assert_close(got_var, ref_var)
    if training:
        assert not np.allclose(got_var, var)  # the running statistics did move
    for got_grad, want_grad in zip(
        ops.batch_norm_backward(nhwc(grad_out), got_saved, weight), F.batch_norm_backward(grad_out, want_saved, weight)
    ):
        assert_close(got_grad if got_grad.ndim == 1 else nchw(got_grad), want_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_relu_and_backward(ops, dtype):
    x = np.array([-2.0, -0.0, 0.0, 3.5, 1e-30, -1e-30, np.inf, -np.inf, np.nan] * 3, dtype=dtype).reshape(3, 1, 3, 3)
    grad_out = np.arange(1, x.size + 1, dtype=dtype).reshape(x.shape)
    want = F.relu(x)
    got = ops.relu_(x.copy())
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ops.relu_backward_(grad_out.copy(), got), F.relu_backward(grad_out, want))


MAXPOOL_INPUTS = {
    "random": lambda rng: rng.standard_normal((2, 3, 9, 7)),
    "integer-ties": lambda rng: rng.integers(0, 3, size=(2, 3, 8, 8)).astype(float),
    "negative-inf-and-nan": lambda rng: np.where(
        rng.random((2, 3, 6, 7)) < 0.3, np.nan, np.where(rng.random((2, 3, 6, 7)) < 0.5, -np.inf, 1.0)
    ),
    "1x1": lambda rng: rng.standard_normal((2, 2, 1, 1)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", list(MAXPOOL_INPUTS))
def test_max_pool2d_and_backward(ops, kind, dtype):
    x = MAXPOOL_INPUTS[kind](np.random.default_rng(3)).astype(dtype)
    want = F.max_pool2d(x, 3, 2, 1)
    got, saved = ops.max_pool2d(nhwc(x))
    np.testing.assert_array_equal(nchw(got), want)
    grad_out = (np.arange(want.size).reshape(want.shape) + 1).astype(dtype)  # distinct: shows where each went
    np.testing.assert_array_equal(
        nchw(ops.max_pool2d_backward(nhwc(grad_out), saved)),
        F.max_pool2d_backward(grad_out, F.max_pool2d_with_indices(x, 3, 2, 1)[1], x.shape),
    )


def test_global_avg_pool_and_backward(ops):
    x = np.random.default_rng(4).standard_normal((2, 3, 5, 4))
    grad_out = np.random.default_rng(5).standard_normal((2, 3))
    assert_close(ops.global_avg_pool(nhwc(x)), F.adaptive_avg_pool2d(x, 1).reshape(2, 3))
    assert_close(nchw(ops.global_avg_pool_backward(grad_out, nhwc(x))), F.adaptive_avg_pool2d_backward(grad_out[..., None, None], x.shape))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("K, C, R", [(40, 3, 3), (64, 5, 1), (8, 2, 7)], ids=str)
def test_pack_weights_lays_out_panels_as_pack_panels(train, K, C, R, dtype):
    """pack_weights (a training step's weights, packed at every step) gives cpu.pack_panels' layout,
    from the weights as given and from a flipped, transposed view (the input gradient's), a last
    partial panel zero-filled; shared out by panels as two threads would."""
    from npresnet_kernels import cpu
    from npresnet_kernels.cpu_kernels import compile_kernels

    kernels = compile_kernels(train.__name__)
    w = np.random.default_rng(4).standard_normal((K, C, R, R)).astype(dtype)
    for given in (w, w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]):
        Kg = given.shape[0]
        want = cpu.pack_panels(np.ascontiguousarray(given.transpose(2, 3, 1, 0)).reshape(1, -1, Kg))
        out = np.full(want.shape, np.nan, dtype=dtype)
        panels = want.shape[1]
        for lo, hi in ((0, panels // 2), (panels // 2, panels)):
            kernels.pack_weights(given, lo, hi, out)
        np.testing.assert_array_equal(out, want)


def test_a_training_pass_pins_the_caller_as_a_forward_pass_does(train, monkeypatch):
    """value_and_grad on the numba backend runs inside its StepBackend's running(): where the backend
    takes every CPU, the calling thread stays on the first for the pass and gets its own affinity back."""
    import os

    import npresnet
    from npresnet_kernels import cpu

    monkeypatch.delenv("NPRESNET_PIN_THREADS", raising=False)
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    cpus = sorted(os.sched_getaffinity(0))
    model = npresnet.build("resnet18", num_classes=3, backend=cpu.NumbaBackend(threads=len(cpus))).train()
    ops = npresnet.autograd.training_ops(model.backend)
    seen = []
    max_pool = type(ops).max_pool2d

    def recording(self, x):
        seen.append(os.sched_getaffinity(0))
        return max_pool(self, x)

    monkeypatch.setattr(type(ops), "max_pool2d", recording)
    before = os.sched_getaffinity(0)
    npresnet.value_and_grad(model, np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32), np.array([0, 2]))
    assert os.sched_getaffinity(0) == before
    assert seen == [{cpus[0]} if len(cpus) > 1 else before]
