"""Each reference op alone against torch.nn.functional, on its edge cases, in float32 and float64."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as TF  # noqa: E402

from helpers import assert_close  # noqa: E402
from npresnet import functional as F  # noqa: E402

DTYPES = [np.float32, np.float64]


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


CONV_CASES = [
    # (N, C, H, W, K, R, stride, padding, groups)
    (1, 3, 8, 8, 4, 3, 1, 1, 1),
    (2, 3, 9, 7, 5, 3, 2, 1, 1),  # stride 2, odd sizes
    (2, 3, 97, 131, 8, 7, 2, 3, 1),  # the ImageNet stem on an odd size
    (1, 4, 1, 1, 6, 3, 1, 1, 1),  # 1x1 input, 3x3 kernel, padding
    (1, 4, 1, 1, 6, 1, 2, 0, 1),  # 1x1 input, strided 1x1 conv
    (2, 8, 6, 5, 8, 3, 2, 1, 4),  # groups
    (1, 64, 5, 5, 64, 3, 1, 1, 32),  # ResNeXt-style, two channels per group
    (2, 6, 7, 7, 12, 1, 2, 0, 1),  # downsample: 1x1 stride 2 on odd size
    (1, 3, 4, 6, 2, 3, 1, 0, 1),  # no padding
    (1, 2, 10, 10, 3, 5, 3, 2, 1),  # stride 3, kernel 5
    (1, 2, 1, 2, 3, 3, 3, 2, 1),  # padding past the kernel's reach: whole offsets read only zeros
    (3, 5, 6, 4, 4, 5, 1, 2, 1),  # 5x5 keeping the size: shifted whole-plane patches
    (1, 2, 2, 3, 3, 7, 1, 3, 1),  # 7x7 keeping the size of a 2x3 image: shifts past whole rows
    (2, 2, 11, 9, 3, 7, 3, 2, 1),  # 7x7 stride 3: patches from the input's stride x stride phases, as the stem's
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "N{}C{}H{}W{}K{}R{}s{}p{}g{}".format(*c))
def test_conv2d(case, dtype):
    N, C, H, W, K, R, stride, padding, groups = case
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C // groups, R, R)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    got = F.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)
    want = TF.conv2d(t(x), t(w), t(b), stride=stride, padding=padding, groups=groups).numpy()
    assert_close(got, want)
    assert got.shape[2:] == (F.conv_output_size(H, R, stride, padding), F.conv_output_size(W, R, stride, padding))


def test_conv2d_integer_valued_exact():
    """Integer-valued data has exact products and sums: any indexing slip shows as a nonzero difference."""
    rng = np.random.default_rng(2)
    x = rng.integers(-3, 4, size=(2, 4, 7, 9)).astype(np.float64)
    w = rng.integers(-2, 3, size=(6, 2, 3, 3)).astype(np.float64)
    got = F.conv2d(x, w, stride=2, padding=1, groups=2)
    want = TF.conv2d(t(x), t(w), stride=2, padding=1, groups=2).numpy()
    np.testing.assert_array_equal(got, want)


# The loop form is the definition, slow in Python: the cases without the big ImageNet-stem input.
@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[2] * c[3] < 1000], ids=lambda c: "N{}C{}H{}W{}K{}R{}s{}p{}g{}".format(*c))
def test_conv2d_loops_is_conv2d(case):
    """The loop form (the sum as papers write it) and the im2col form agree exactly on integer-valued data."""
    N, C, H, W, K, R, stride, padding, groups = case
    rng = np.random.default_rng(8)
    x = rng.integers(-3, 4, size=(N, C, H, W)).astype(np.float64)
    w = rng.integers(-2, 3, size=(K, C // groups, R, R)).astype(np.float64)
    b = rng.integers(-2, 3, size=K).astype(np.float64)
    want = TF.conv2d(t(x), t(w), t(b), stride=stride, padding=padding, groups=groups).numpy()
    np.testing.assert_array_equal(F.conv2d_loops(x, w, b, stride, padding, groups), want)
    np.testing.assert_array_equal(F.conv2d(x, w, b, stride=stride, padding=padding, groups=groups), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("relu, residual", [(False, False), (True, False), (True, True)], ids=["plain", "relu", "residual_relu"])
def test_conv2d_bias_act(relu, residual, dtype):
    """What a backend's convolution computes: conv + bias [+ residual], then [ReLU], as torch's ops in that order."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 8, 7, 6)).astype(dtype)
    w = rng.standard_normal((6, 4, 3, 3)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    res = rng.standard_normal((2, 6, 4, 3)).astype(dtype) if residual else None
    want = TF.conv2d(t(x), t(w), t(b), stride=2, padding=1, groups=2)
    if residual:
        want = want + t(res)
    if relu:
        want = TF.relu(want)
    got = F.conv2d_bias_act(x, w, b, stride=2, padding=1, groups=2, residual=res, relu=relu)
    assert_close(got, want.numpy())


def test_conv2d_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="channels"):
        F.conv2d(np.zeros((1, 3, 4, 4)), np.zeros((2, 4, 3, 3)))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_batch_norm(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 3, 4)).astype(dtype)
    mean, bias = (rng.standard_normal(5).astype(dtype) for _ in range(2))
    var, weight = (rng.uniform(0.1, 2, 5).astype(dtype) for _ in range(2))
    got = F.batch_norm(x, mean, var, weight, bias)
    want = TF.batch_norm(t(x), t(mean), t(var), t(weight), t(bias), training=False, eps=1e-5).numpy()
    assert_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_fold_batch_norm_matches_conv_then_bn(dtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 6, 6)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 3)).astype(dtype)
    mean, bias = (rng.standard_normal(6).astype(dtype) for _ in range(2))
    var, weight = (rng.uniform(0.1, 2, 6).astype(dtype) for _ in range(2))
    fw, fb = F.fold_batch_norm(w, mean, var, weight, bias)
    got = F.conv2d(x, fw.astype(dtype), fb.astype(dtype), padding=1, groups=2)
    conv = TF.conv2d(t(x), t(w), padding=1, groups=2)
    want = TF.batch_norm(conv, t(mean), t(var), t(weight), t(bias), training=False, eps=1e-5).numpy()
    assert_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_relu(dtype):
    x = np.array([-2.0, -0.0, 0.0, 3.5, np.nan, -np.inf, np.inf], dtype=dtype)
    got = F.relu(x.copy())
    want = TF.relu(t(x)).numpy()
    np.testing.assert_array_equal(got, want)
    assert got.dtype == dtype
    y = x.copy()
    assert F.relu(y, out=y) is y  # in place


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 3), (5, 7), (8, 8), (112, 97)], ids=lambda s: "{}x{}".format(*s))
def test_max_pool2d(hw, dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, *hw)).astype(dtype)
    got = F.max_pool2d(x, 3, 2, 1)
    want = TF.max_pool2d(t(x), 3, 2, 1).numpy()
    assert_close(got, want, tol=0)


def test_max_pool2d_padding_never_wins():
    """All-negative input: zero padding would win the max at the borders; -inf padding must not."""
    x = -1.0 - np.arange(2 * 5 * 5, dtype=np.float32).reshape(1, 2, 5, 5)
    got = F.max_pool2d(x)
    assert np.all(got < 0)
    np.testing.assert_array_equal(got, TF.max_pool2d(t(x), 3, 2, 1).numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape_out", [((1, 1), 1), ((7, 7), 1), ((5, 3), 1), ((7, 9), (3, 2)), ((4, 4), (4, 4))])
def test_adaptive_avg_pool2d(shape_out, dtype):
    hw, out = shape_out
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, *hw)).astype(dtype)
    got = F.adaptive_avg_pool2d(x, out)
    want = TF.adaptive_avg_pool2d(t(x), out).numpy()
    assert_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_linear(dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 16)).astype(dtype)
    w = rng.standard_normal((10, 16)).astype(dtype)
    b = rng.standard_normal(10).astype(dtype)
    assert_close(F.linear(x, w, b), TF.linear(t(x), t(w), t(b)).numpy())
