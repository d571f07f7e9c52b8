"""The CUDA kernels and backend against the NumPy reference ops, then a whole network against the NumPy backend.

Shapes are tiny and odd-sized (partial tiles everywhere): under the simulator every CUDA thread is
a Python thread. The same tests run unchanged on a GPU.
"""
import os

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="needs numba-cuda: pip install 'npresnet[cuda]'")

import npresnet  # noqa: E402
import npresnet_kernels.cuda as kc  # noqa: E402
from helpers import assert_close  # noqa: E402
from npresnet import functional as F  # noqa: E402
from npresnet.backends import FoldedConv, get_backend  # noqa: E402
from npresnet.model import random_state_dict  # noqa: E402
from npresnet.specs import BASIC, BOTTLENECK, ResNetSpec  # noqa: E402

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
DTYPES = {"f32": np.float32, "f64": np.float64}


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def run_conv(x, weight, bias, stride, padding, groups, relu, residual, tiling=None):
    handle = kc.upload_conv(FoldedConv(weight, bias, stride, padding, groups))
    res = None if residual is None else cuda.to_device(residual)
    return kc.conv2d(cuda.to_device(x), handle, relu=relu, residual=res, tiling=tiling).copy_to_host()


def reference_conv(x, weight, bias, stride, padding, groups, relu, residual):
    return F.conv2d_bias_act(x, weight, bias, stride, padding, groups, residual, relu)


# (N, C, H, W, K, kernel, stride, padding, groups): the convolutions a ResNet has, at toy sizes.
CONVS = {
    "stem7x7s2": (1, 3, 11, 9, 8, 7, 2, 3, 1),
    "3x3": (2, 5, 5, 6, 9, 3, 1, 1, 1),
    "3x3s2": (1, 6, 7, 5, 10, 3, 2, 1, 1),
    "1x1": (2, 12, 3, 3, 20, 1, 1, 0, 1),
    "1x1s2_downsample": (1, 8, 5, 5, 12, 1, 2, 0, 1),
    "grouped3x3": (1, 16, 4, 5, 16, 3, 1, 1, 4),
    "grouped3x3s2": (2, 24, 5, 5, 24, 3, 2, 1, 8),
    "grouped3x3_small": (1, 8, 3, 3, 6, 3, 1, 1, 2),
    "one_position": (1, 12, 1, 1, 20, 3, 1, 1, 1),  # partial tiles of every tiling, a partial last BK slice
}


EPILOGUES = ["plain", "relu", "residual_relu"]
# Each convolution once, the epilogue and dtype turning round with it: the shape (strides, groups, partial
# tiles, the tiling choose_tiling picks), the epilogue (runtime flags on the same indices) and the dtype
# (one compiled kernel per dtype and tiling) are independent, so the 9 cases meet all 6 epilogue x dtype
# pairs and every tiling in both dtypes (square: 3x3 f32, 3x3s2 f64; flat: stem f64, grouped3x3 f32; column:
# one_position f64; and every tiling in float32 below) without the 54-test product, a minute under the simulator.
TILED_CASES = [(case, EPILOGUES[i % 3], list(DTYPES)[(i + 1) % 2]) for i, case in enumerate(CONVS)]


@pytest.mark.parametrize("case, epilogue, dtype_id", TILED_CASES)
def test_tiled_conv_matches_reference(case, epilogue, dtype_id):
    N, C, H, W, K, R, stride, padding, groups = CONVS[case]
    dtype = DTYPES[dtype_id]
    rng = np.random.default_rng(0)
    x, weight, bias = randn(rng, (N, C, H, W), dtype), randn(rng, (K, C // groups, R, R), dtype), randn(rng, K, dtype)
    P, Q = F.conv_output_size(H, R, stride, padding), F.conv_output_size(W, R, stride, padding)
    residual = randn(rng, (N, K, P, Q), dtype) if epilogue == "residual_relu" else None
    relu = epilogue != "plain"
    args = (x, weight, bias, stride, padding, groups, relu, residual)
    assert_close(run_conv(*args), reference_conv(*args))


@pytest.mark.parametrize("tiling", list(kc.TILINGS))
@pytest.mark.parametrize("case", ["3x3s2", "grouped3x3_small", "one_position"])
def test_every_tiling_matches_reference(case, tiling):
    # Each tile shape on shapes it would not be chosen for: partial tiles on both GEMM axes.
    N, C, H, W, K, R, stride, padding, groups = CONVS[case]
    rng = np.random.default_rng(1)
    x, weight, bias = randn(rng, (N, C, H, W), np.float32), randn(rng, (K, C // groups, R, R), np.float32), randn(rng, K, np.float32)
    args = (x, weight, bias, stride, padding, groups, True, None)
    assert_close(run_conv(*args, tiling=kc.TILINGS[tiling]), reference_conv(*args))


def test_tiled_conv_is_exact_on_integers():
    # Small integers sum exactly in float32, whatever the order: any indexing slip shows as a mismatch.
    rng = np.random.default_rng(2)
    x = rng.integers(-3, 4, (2, 8, 5, 5)).astype(np.float32)
    weight = rng.integers(-3, 4, (8, 2, 3, 3)).astype(np.float32)
    bias = rng.integers(-3, 4, 8).astype(np.float32)
    args = (x, weight, bias, 2, 1, 4, False, None)
    np.testing.assert_array_equal(run_conv(*args), reference_conv(*args))


@pytest.mark.parametrize("dtype_id", list(DTYPES))
def test_naive_conv_matches_reference(dtype_id):
    N, C, H, W, K, R, stride, padding, groups = CONVS["grouped3x3s2"]
    dtype = DTYPES[dtype_id]
    rng = np.random.default_rng(3)
    x, weight, bias = randn(rng, (N, C, H, W), dtype), randn(rng, (K, C // groups, R, R), dtype), randn(rng, K, dtype)
    P, Q = F.conv_output_size(H, R, stride, padding), F.conv_output_size(W, R, stride, padding)
    residual = randn(rng, (N, K, P, Q), dtype)
    out = cuda.device_array((N, K, P, Q), dtype=dtype)
    kc.conv2d_naive_kernel[kc._blocks(out.size), kc.THREADS_1D](
        cuda.to_device(x), cuda.to_device(weight), cuda.to_device(bias), cuda.to_device(residual), out, stride, padding, 1, 1
    )
    assert_close(out.copy_to_host(), reference_conv(x, weight, bias, stride, padding, groups, True, residual))


def test_relu_keeps_nan():
    x = np.full((1, 1, 2, 2), np.nan, dtype=np.float32)
    weight, bias = np.ones((2, 1, 1, 1), np.float32), np.zeros(2, np.float32)
    assert np.isnan(run_conv(x, weight, bias, 1, 0, 1, True, None)).all()


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("shape", [(2, 3, 7, 6), (1, 2, 1, 1), (1, 1, 2, 5), (1, 4, 8, 8)], ids=lambda s: "x".join(map(str, s)))
def test_max_pool_matches_reference(shape, dtype_id):
    x = randn(np.random.default_rng(4), shape, DTYPES[dtype_id])
    assert_close(kc.max_pool2d(cuda.to_device(x)).copy_to_host(), F.max_pool2d(x))


def test_max_pool_padding_never_wins_and_nan_propagates():
    x = -1.0 - np.arange(2 * 5 * 5, dtype=np.float32).reshape(1, 2, 5, 5)  # all negative
    x[0, 1, 0, 0] = np.nan
    got = kc.max_pool2d(cuda.to_device(x)).copy_to_host()
    want = F.max_pool2d(x)
    np.testing.assert_array_equal(got, want)  # NaN == NaN position-wise in assert_array_equal
    assert np.isnan(got[0, 1, 0, 0]) and not np.isnan(got[0, 0]).any()


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 3, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_global_avg_pool_matches_reference(shape, dtype_id):
    x = randn(np.random.default_rng(5), shape, DTYPES[dtype_id])
    got = kc.global_avg_pool(cuda.to_device(x)).copy_to_host()
    assert_close(got, F.adaptive_avg_pool2d(x, 1).reshape(shape[:2]))


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("batch", [1, 3])
def test_linear_matches_reference(batch, dtype_id):
    dtype = DTYPES[dtype_id]
    rng = np.random.default_rng(6)
    x, weight, bias = randn(rng, (batch, 24), dtype), randn(rng, (13, 24), dtype), randn(rng, 13, dtype)
    ops = get_backend("cuda")
    got = ops.to_numpy(ops.linear(ops.from_numpy(x), ops.prepare_linear(weight, bias)))
    assert_close(got, F.linear(x, weight, bias))


# --- a whole network --------------------------------------------------------------------------

# Networks of every kind of block at 4 to 16 channels: the full-width family carries 11M to 88M
# weights, which the simulator would take many minutes to stream through its Python threads.
TINY_SPECS = {
    # stem 8; layer1 8 -> 8; layer2 8 -> 8, stride 2; layer3 8 -> 12, stride 2, downsample; layer4 12 -> 16.
    "basic": ResNetSpec("tiny_basic", BASIC, (1, 1, 1, 1), num_classes=10, planes=(8, 8, 12, 16)),
    # stem 4; every block a Bottleneck of width 8 in 4 groups, 16 channels out, with a downsample.
    "grouped_bottleneck": ResNetSpec(
        "tiny_resnext", BOTTLENECK, (1, 1, 1, 1), groups=4, width_per_group=32, num_classes=10, planes=(4, 4, 4, 4)
    ),
}


def tiny_state(spec, dtype, seed=7):
    """Random parameters, batch-norm statistics included, so that folding matters."""
    rng = np.random.default_rng(seed)
    state = random_state_dict(spec, seed=seed, dtype=dtype)
    for key, value in state.items():
        if key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, value.shape).astype(dtype)
        elif key.endswith(("running_mean", ".bias")) and not key.startswith("fc"):
            state[key] = (0.1 * rng.standard_normal(value.shape)).astype(dtype)
        elif value.ndim == 1 and key.endswith(".weight"):
            state[key] = rng.uniform(0.5, 1.5, value.shape).astype(dtype)
    return state


NETWORK_CASES = [
    (spec_id, shape, dtype_id)
    for spec_id, shape in [("basic", (2, 3, 19, 16)), ("grouped_bottleneck", (1, 3, 1, 1))]
    for dtype_id in DTYPES
]
if SIMULATOR:
    # A forward pass takes 5-10 s under the simulator, whatever the input size (each kernel launch starts
    # 64-128 Python threads): one dtype per network here. Every kernel runs in both dtypes above, and the
    # basic network in float32 is compared in test_one_copy_in_and_one_copy_out_per_forward; a GPU runs all four.
    NETWORK_CASES = [case for case in NETWORK_CASES if (case[0], case[2]) in {("basic", "f64"), ("grouped_bottleneck", "f32")}]


@pytest.mark.parametrize(
    "spec_id, shape, dtype_id",
    NETWORK_CASES,
    ids=lambda v: v if isinstance(v, str) else "N{}_{}x{}".format(v[0], *v[2:]),
)
def test_tiny_network_matches_numpy_backend(spec_id, shape, dtype_id):
    spec, dtype = TINY_SPECS[spec_id], DTYPES[dtype_id]
    state = tiny_state(spec, dtype)
    gpu = npresnet.build(spec, state, backend="cuda")
    ref = npresnet.build(spec, state, backend="numpy")
    x = randn(np.random.default_rng(8), shape, dtype)
    assert_close(gpu(x), ref(x))
    got, want = gpu.features(x), ref.features(x)
    assert list(got) == list(npresnet.FEATURE_NAMES)
    for name in want:
        assert_close(got[name], want[name])


def test_one_copy_in_and_one_copy_out_per_forward(monkeypatch):
    state = tiny_state(TINY_SPECS["basic"], np.float32)
    model = npresnet.build(TINY_SPECS["basic"], state, backend="cuda")
    x = randn(np.random.default_rng(9), (1, 3, 9, 9), np.float32)
    # The first call uploads the weights; it is also the float32 basic network against the NumPy backend.
    assert_close(model(x), npresnet.build(TINY_SPECS["basic"], state, backend="numpy")(x))
    copies = {"to_device": 0, "to_host": 0}
    to_device = cuda.to_device
    device_array_type = type(cuda.device_array(1))
    copy_to_host = device_array_type.copy_to_host

    def counting_to_device(*args, **kwargs):
        copies["to_device"] += 1
        return to_device(*args, **kwargs)

    def counting_copy_to_host(self, *args, **kwargs):
        copies["to_host"] += 1
        return copy_to_host(self, *args, **kwargs)

    monkeypatch.setattr(kc.cuda, "to_device", counting_to_device)
    monkeypatch.setattr(device_array_type, "copy_to_host", counting_copy_to_host)
    model(x)
    assert copies == {"to_device": 1, "to_host": 1}


# Minutes each under the simulator (bench/results/notes.md): on a GPU only.
@pytest.mark.skipif(SIMULATOR, reason="full-width networks take 6 to 12 minutes each under the simulator")
@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_full_network_matches_numpy_backend(arch, dtype_id):
    dtype = DTYPES[dtype_id]
    gpu = npresnet.build(arch, backend="cuda")
    ref = npresnet.build(arch, gpu.state_dict(), backend="numpy")
    x = randn(np.random.default_rng(10), (2, 3, 64, 64), dtype)
    assert_close(gpu(x), ref(x))
    got, want = gpu.features(x), ref.features(x)
    for name in want:
        assert_close(got[name], want[name])
