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
from npresnet.backends import FoldedConv, NumpyBackend, get_backend  # noqa: E402
from npresnet.model import PreparedNet, ResNet  # noqa: E402

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
DTYPES = {"f32": np.float32, "f64": np.float64}


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def run_conv(x, weight, bias, stride, padding, groups, relu, residual, tiling=None):
    handle = kc.upload_conv(FoldedConv(weight, bias, stride, padding, groups))
    res = None if residual is None else cuda.to_device(residual)
    return kc.conv2d(cuda.to_device(x), handle, relu=relu, residual=res, tiling=tiling).copy_to_host()


def reference_conv(x, weight, bias, stride, padding, groups, relu, residual):
    out = F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=groups)
    if residual is not None:
        out += residual
    return F.relu(out) if relu else out


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
    "one_position": (1, 40, 1, 1, 70, 3, 1, 1, 1),
}


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("epilogue", ["plain", "relu", "residual_relu"])
@pytest.mark.parametrize("case", list(CONVS))
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


def tiny_state(rng, dtype):
    """A four-stage network with every kind of block, at 4 to 16 channels.

    layer1: BasicBlock 8 -> 8; layer2: BasicBlock 8 -> 12, stride 2, downsample;
    layer3: grouped Bottleneck 12 -> 16 (width 8, 4 groups), stride 2, downsample;
    layer4: grouped Bottleneck 16 -> 16 (width 8, 4 groups). fc: 16 -> 10.
    """
    def conv(K, C, R, stride, padding, groups=1):
        return FoldedConv(
            randn(rng, (K, C // groups, R, R), dtype) * dtype(np.sqrt(2.0 / (C // groups * R * R))),
            randn(rng, K, dtype) * dtype(0.1),
            stride, padding, groups,
        )

    def basic(inplanes, planes, stride):
        block = {"conv1": conv(planes, inplanes, 3, stride, 1), "conv2": conv(planes, planes, 3, 1, 1)}
        if stride != 1 or inplanes != planes:
            block["downsample"] = conv(planes, inplanes, 1, stride, 0)
        return block

    def bottleneck(inplanes, width, outplanes, stride, groups):
        block = {
            "conv1": conv(width, inplanes, 1, 1, 0),
            "conv2": conv(width, width, 3, stride, 1, groups),
            "conv3": conv(outplanes, width, 1, 1, 0),
        }
        if stride != 1 or inplanes != outplanes:
            block["downsample"] = conv(outplanes, inplanes, 1, stride, 0)
        return block

    stem = conv(8, 3, 7, 2, 3)
    stages = [[basic(8, 8, 1)], [basic(8, 12, 2)], [bottleneck(12, 8, 16, 2, 4)], [bottleneck(16, 8, 16, 1, 4)]]
    fc = (randn(rng, (10, 16), dtype) * dtype(0.25), randn(rng, 10, dtype))
    return stem, stages, fc


class TinyResNet(ResNet):
    """ResNet's own forward pass (stem, max pool, residual blocks, pooling, fc, features) over tiny_state.

    The full-width family carries 11M to 88M weights, which the simulator would take many minutes
    to stream through its Python threads; only the prepared network is swapped here.
    """

    def _prepare(self, dtype):
        dtype = np.dtype(dtype)
        if dtype not in self._prepared:
            stem, stages, fc = tiny_state(np.random.default_rng(7), dtype.type)
            ops = self.backend
            self._prepared[dtype] = PreparedNet(
                stem=ops.prepare_conv(stem),
                max_pool=True,
                stages=[[{role: ops.prepare_conv(c) for role, c in block.items()} for block in stage] for stage in stages],
                fc=ops.prepare_linear(*fc),
            )
        return self._prepared[dtype]


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("shape", [(2, 3, 19, 16), (1, 3, 1, 1)], ids=lambda s: "N{}_{}x{}".format(s[0], *s[2:]))
def test_tiny_network_matches_numpy_backend(shape, dtype_id):
    spec = npresnet.get_spec("resnet18")  # unused by TinyResNet's forward; fresh state is only validated
    gpu = TinyResNet(spec, backend="cuda")
    ref = TinyResNet(spec, backend=NumpyBackend())
    x = randn(np.random.default_rng(8), shape, DTYPES[dtype_id])
    assert_close(gpu(x), ref(x))
    got, want = gpu.features(x), ref.features(x)
    assert list(got) == list(npresnet.FEATURE_NAMES)
    for name in want:
        assert_close(got[name], want[name])


def test_one_copy_in_and_one_copy_out_per_forward(monkeypatch):
    model = TinyResNet(npresnet.get_spec("resnet18"), backend="cuda")
    x = randn(np.random.default_rng(9), (1, 3, 9, 9), np.float32)
    model(x)  # the first call uploads the weights
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


# Measured once by hand under the simulator, on a shared 2-core machine, at 1x3x16x16 float32:
# resnet18 in about 380 s and resnext50_32x4d in about 730 s, both within 1.1e-6 of the NumPy backend.
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
