"""Backward passes against torch autograd: each op alone, then whole networks in train and eval mode."""
import copy
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as TF  # noqa: E402

import npresnet  # noqa: E402
from helpers import assert_close  # noqa: E402
from npresnet import functional as F  # noqa: E402
from npresnet.specs import ARCHITECTURES, BOTTLENECK, ResNetSpec, get_spec  # noqa: E402
from torch_resnet import numpy_state_dict, randomise, torch_resnet  # noqa: E402

DTYPES = [np.float32, np.float64]


def t(a, grad=False):
    return torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(grad)


# --- each op alone ----------------------------------------------------------------------------

CONV_CASES = [
    # (N, C, H, W, K, R, stride, padding, groups)
    (2, 3, 9, 7, 4, 3, 1, 1, 1),  # 3x3, odd sizes
    (2, 4, 9, 8, 6, 3, 2, 1, 2),  # stride 2, groups 2
    (1, 8, 6, 5, 8, 3, 2, 1, 4),  # groups 4
    (1, 16, 5, 5, 16, 3, 1, 1, 8),  # ResNeXt-style, two channels per group
    (2, 3, 13, 11, 4, 7, 2, 3, 1),  # the ImageNet stem on an odd size
    (2, 6, 7, 7, 12, 1, 2, 0, 1),  # downsample: 1x1 stride 2 on an odd size
    (2, 5, 4, 6, 3, 1, 1, 0, 1),  # 1x1 stride 1
    (1, 3, 4, 6, 2, 3, 1, 0, 1),  # no padding
    (1, 2, 5, 5, 3, 3, 1, 3, 1),  # padding 3 on a 3x3 kernel
    (2, 8, 3, 3, 256, 3, 2, 1, 1),  # 256 output channels: the weight gradient as grad_out @ patches^T
    (2, 4, 5, 3, 2, 5, 1, 2, 2),  # 5x5 keeping the size, groups 2: shifted whole-plane patches
    (1, 2, 2, 3, 3, 7, 1, 3, 1),  # 7x7 keeping the size of a 2x3 image: every shift passes a whole row
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "N{}C{}H{}W{}K{}R{}s{}p{}g{}".format(*c))
def test_conv2d_backward(case, dtype):
    N, C, H, W, K, R, stride, padding, groups = case
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C // groups, R, R)).astype(dtype)
    out = F.conv2d(x, w, stride=stride, padding=padding, groups=groups)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    tx, tw = t(x, True), t(w, True)
    TF.conv2d(tx, tw, stride=stride, padding=padding, groups=groups).backward(t(grad_out))
    grad_x, grad_w = F.conv2d_backward(grad_out, x, w, stride, padding, groups)
    assert_close(grad_x, tx.grad.numpy())
    assert_close(grad_w, tw.grad.numpy())
    assert F.conv2d_backward(grad_out, x, w, stride, padding, groups, input_grad=False)[0] is None


@pytest.mark.parametrize("stride", [2, 1], ids=["stride2", "stride1"])  # stride 1: both gradients from grad_out's patches
def test_conv2d_backward_in_chunks(monkeypatch, stride):
    """Images processed a few at a time (forward and backward) give the same sums as all at once."""
    rng = np.random.default_rng(2)
    x = rng.integers(-3, 4, size=(5, 4, 6, 6)).astype(np.float64)
    w = rng.integers(-2, 3, size=(4, 2, 3, 3)).astype(np.float64)
    P = F.conv_output_size(6, 3, stride, 1)
    grad_out = rng.integers(-2, 3, size=(5, 4, P, P)).astype(np.float64)
    whole = F.conv2d_backward(grad_out, x, w, stride, 1, 2)
    forward = F.conv2d(x, w, stride=stride, padding=1, groups=2)
    monkeypatch.setattr(F, "CONV_CHUNK_ELEMENTS", 1)
    chunked = F.conv2d_backward(grad_out, x, w, stride, 1, 2)
    np.testing.assert_array_equal(F.conv2d(x, w, stride=stride, padding=1, groups=2), forward)
    np.testing.assert_array_equal(forward, TF.conv2d(t(x), t(w), stride=stride, padding=1, groups=2).numpy())
    tx, tw = t(x, True), t(w, True)
    TF.conv2d(tx, tw, stride=stride, padding=1, groups=2).backward(t(grad_out))
    for got, want, exact in zip(chunked, whole, (tx.grad.numpy(), tw.grad.numpy())):
        np.testing.assert_array_equal(got, exact)  # integer-valued: exact
        np.testing.assert_array_equal(want, exact)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunks"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "N{}C{}H{}W{}K{}R{}s{}p{}g{}".format(*c))
def test_conv2d_and_backward_keep_the_input_layout(monkeypatch, case, chunked):
    """The training pass keeps activations channel-major: such inputs give the same sums (integer-valued
    here, so exact whatever the order) with outputs and input gradients laid out channel by channel;
    C-ordered inputs give C-ordered outputs."""
    N, C, H, W, K, R, stride, padding, groups = case
    rng = np.random.default_rng(7)
    x = rng.integers(-3, 4, size=(N, C, H, W)).astype(np.float64)
    w = rng.integers(-2, 3, size=(K, C // groups, R, R)).astype(np.float64)
    out = F.conv2d(x, w, stride=stride, padding=padding, groups=groups)
    grad_out = rng.integers(-2, 3, size=out.shape).astype(np.float64)
    grad_x, grad_w = F.conv2d_backward(grad_out, x, w, stride, padding, groups)
    assert out.flags.c_contiguous and grad_x.flags.c_contiguous
    if chunked:
        monkeypatch.setattr(F, "CONV_CHUNK_ELEMENTS", 1)
    x_cm, grad_out_cm = F.to_channel_major(x), F.to_channel_major(grad_out)
    assert F.channel_major(x_cm) and not F.channel_major(x) or N == 1
    out_cm = F.conv2d(x_cm, w, stride=stride, padding=padding, groups=groups)
    grad_x_cm, grad_w_cm = F.conv2d_backward(grad_out_cm, x_cm, w, stride, padding, groups)
    for got, want in ((out_cm, out), (grad_x_cm, grad_x), (grad_w_cm, grad_w)):
        np.testing.assert_array_equal(got, want)
    assert F.channel_major(out_cm) and F.channel_major(grad_x_cm)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_backward_of_no_images_is_zero(stride):
    x = np.zeros((0, 3, 5, 5))
    w = np.ones((4, 3, 3, 3))
    grad_out = np.zeros(F.conv2d(x, w, stride=stride, padding=1).shape)
    grad_x, grad_w = F.conv2d_backward(grad_out, x, w, stride, 1)
    assert grad_x.shape == x.shape
    np.testing.assert_array_equal(grad_w, np.zeros_like(w))


def bn_inputs(dtype, shape=(3, 5, 4, 3), seed=3):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    mean, bias = (rng.standard_normal(C).astype(dtype) * 0.1 for _ in range(2))
    var, weight = (rng.uniform(0.5, 2, C).astype(dtype) for _ in range(2))
    return x, mean, var, weight, bias, rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_forward_backward_and_running_stats(training, dtype):
    x, mean, var, weight, bias, grad_out = bn_inputs(dtype)
    t_mean, t_var = t(mean.copy()), t(var.copy())
    tx, tw, tb = t(x, True), t(weight, True), t(bias, True)
    want = TF.batch_norm(tx, t_mean, t_var, tw, tb, training=training, momentum=0.1, eps=1e-5)
    want.backward(t(grad_out))
    if training:
        out, saved = F.batch_norm_train(x, mean, var, weight, bias, momentum=0.1)
    else:
        out, saved = F.batch_norm_eval(x, mean, var, weight, bias)
    assert_close(out, want.detach().numpy())
    assert_close(mean, t_mean.numpy())  # running statistics: updated in place in training mode only
    assert_close(var, t_var.numpy())
    grad_x, grad_w, grad_b = F.batch_norm_backward(grad_out, saved, weight)
    assert_close(grad_x, tx.grad.numpy())
    assert_close(grad_w, tw.grad.numpy())
    assert_close(grad_b, tb.grad.numpy())


def test_batch_norm_in_channel_blocks_is_batch_norm_whole(monkeypatch):
    """Channels a block at a time (2 a block, the last one short) give the same numbers, bit for bit,
    in either layout: each channel's sums are its own."""
    x, mean, var, weight, bias, grad_out = bn_inputs(np.float32, shape=(3, 5, 4, 3))
    for layout in (np.ascontiguousarray, F.to_channel_major):
        results = []
        for block in (F.BN_BLOCK_ELEMENTS, 2 * 3 * 4 * 3):
            monkeypatch.setattr(F, "BN_BLOCK_ELEMENTS", block)
            running = mean.copy(), var.copy()
            out, saved = F.batch_norm_train(layout(x), *running, weight, bias, momentum=0.1)
            results.append((out, *saved[:2], *running, *F.batch_norm_backward(layout(grad_out), saved, weight)))
        assert len(F.channel_blocks(x)) == 3
        for whole, blocked in zip(*results):
            np.testing.assert_array_equal(blocked, whole)


def test_batch_norm_train_float32_on_a_channel_far_from_zero():
    """Mean 1000x the spread, 4096 values a channel: the statistics and the gradient sums must be taken
    over centred values, as written. E[x^2] - E[x]^2 in float32 is off by 20% here, and
    sum(grad_out * x) - mean * sum(grad_out) gives grad_weight 1.5e-3 off; both fail the 1e-4 target.
    The reference is float64 on the same float32 inputs, so only the op's own rounding is measured
    (torch's float32 is within 3e-5 on every output here)."""
    rng = np.random.default_rng(8)
    shape = (4, 3, 32, 32)
    x = (100 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    grad_out = rng.standard_normal(shape).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    bias = (0.1 * rng.standard_normal(3)).astype(np.float32)
    tx, tw, tb = t(x.astype(np.float64), True), t(weight.astype(np.float64), True), t(bias.astype(np.float64), True)
    want = TF.batch_norm(tx, None, None, tw, tb, training=True, eps=F.BN_EPS)
    want.backward(t(grad_out.astype(np.float64)))
    out, saved = F.batch_norm_train(x, None, None, weight, bias)
    got = (out, *F.batch_norm_backward(grad_out, saved, weight))
    for g, w in zip(got, (want, tx.grad, tw.grad, tb.grad)):
        assert_close(g, w.detach().numpy().astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_relu_backward(dtype):
    x = np.array([[-2.0, -0.0, 0.0, 3.5, 1e-30, -1e-30, np.inf]], dtype=dtype)
    grad_out = np.arange(1, 8, dtype=dtype).reshape(1, 7)
    tx = t(x, True)
    TF.relu(tx).backward(t(grad_out))
    np.testing.assert_array_equal(F.relu_backward(grad_out, F.relu(x.copy())), tx.grad.numpy())


MAXPOOL_INPUTS = {
    "random": lambda rng: rng.standard_normal((2, 3, 9, 7)),
    "integer-ties": lambda rng: rng.integers(0, 3, size=(2, 3, 8, 8)).astype(float),
    "constant": lambda rng: np.ones((1, 2, 7, 6)),
    "negative-constant": lambda rng: -np.ones((1, 2, 5, 5)),  # padding must never win
    "1x1": lambda rng: rng.standard_normal((2, 2, 1, 1)),
    # NaN wins, the last one in scan order; a window of -inf inside picks its first element inside.
    "nan": lambda rng: np.where(rng.random((2, 3, 9, 8)) < 0.2, np.nan, rng.integers(0, 3, size=(2, 3, 9, 8))),
    "minus-inf": lambda rng: np.where(rng.random((2, 3, 9, 8)) < 0.7, -np.inf, rng.integers(0, 3, size=(2, 3, 9, 8))),
}


@pytest.mark.parametrize("planes_a_block", [None, 4], ids=["one-block", "blocks-of-4"])  # 4: the last block short
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", list(MAXPOOL_INPUTS))
def test_max_pool2d_indices_and_backward_pick_torchs_element(monkeypatch, kind, dtype, planes_a_block):
    rng = np.random.default_rng(4)
    x = MAXPOOL_INPUTS[kind](rng).astype(dtype)
    if planes_a_block:  # a block's phases: planes * stride**2 * (Hp + 1) * Wp elements, Hp = ceil((H + 1) / 2) + 1
        Hp, Wp = -(-(x.shape[2] + 1) // 2) + 1, -(-(x.shape[3] + 1) // 2) + 1
        monkeypatch.setattr(F, "POOL_BLOCK_ELEMENTS", planes_a_block * 4 * (Hp + 1) * Wp)
    out, indices = F.max_pool2d_with_indices(x, 3, 2, 1)
    tx = t(x, True)
    want_out, want_indices = TF.max_pool2d(tx, 3, 2, 1, return_indices=True)
    np.testing.assert_array_equal(out, want_out.detach().numpy())
    np.testing.assert_array_equal(out, F.max_pool2d(x, 3, 2, 1))
    np.testing.assert_array_equal(indices, want_indices.numpy())
    grad_out = (np.arange(out.size).reshape(out.shape) + 1).astype(dtype)  # distinct: shows where each went
    want_out.backward(t(grad_out))
    np.testing.assert_array_equal(F.max_pool2d_backward(grad_out, indices, x.shape), tx.grad.numpy())
    # Channel-major in (the training pass's layout), the same values out, laid out channel by channel.
    out_cm, indices_cm = F.max_pool2d_with_indices(F.to_channel_major(x), 3, 2, 1)
    grad_x_cm = F.max_pool2d_backward(F.to_channel_major(grad_out), indices_cm, x.shape)
    for got, want in ((out_cm, out), (indices_cm, indices), (grad_x_cm, tx.grad.numpy())):
        np.testing.assert_array_equal(got, want)
        assert F.channel_major(got)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_max_pool2d_backward_adds_in_torchs_order_and_keeps_non_finite_gradients_to_the_winner(dtype):
    """Random gradients (sums where windows overlap round as torch's do, in window order), with NaN and inf
    among them: as in torch, a non-finite gradient reaches its window's winner and no other element."""
    rng = np.random.default_rng(6)
    x = rng.integers(0, 4, (2, 3, 9, 8)).astype(dtype)  # ties: one element often wins several windows
    out, indices = F.max_pool2d_with_indices(x, 3, 2, 1)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    grad_out.reshape(-1)[::11] = np.nan
    grad_out.reshape(-1)[1::13] = np.inf
    tx = t(x, True)
    TF.max_pool2d(tx, 3, 2, 1).backward(t(grad_out))
    want = tx.grad.numpy()
    assert np.isfinite(want).mean() > 0.5 and (want != 0).any()
    np.testing.assert_array_equal(F.max_pool2d_backward(grad_out, indices, x.shape), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("hw_out", [((5, 3), 1), ((7, 9), (3, 2))], ids=["global", "3x2"])
def test_adaptive_avg_pool2d_backward(hw_out, dtype):
    hw, out = hw_out
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, *hw)).astype(dtype)
    tx = t(x, True)
    y = TF.adaptive_avg_pool2d(tx, out)
    grad_out = rng.standard_normal(tuple(y.shape)).astype(dtype)
    y.backward(t(grad_out))
    assert_close(F.adaptive_avg_pool2d_backward(grad_out, x.shape), tx.grad.numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_linear_backward(dtype):
    rng = np.random.default_rng(6)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((4, 16), (10, 16), (10,)))
    grad_out = rng.standard_normal((4, 10)).astype(dtype)
    tx, tw, tb = t(x, True), t(w, True), t(b, True)
    TF.linear(tx, tw, tb).backward(t(grad_out))
    for got, want in zip(F.linear_backward(grad_out, x, w), (tx.grad, tw.grad, tb.grad)):
        assert_close(got, want.numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_cross_entropy_and_gradient(smoothing, dtype):
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((5, 7)) * 3).astype(dtype)
    labels = np.array([0, 6, 3, 3, 1])
    tl = t(logits, True)
    want = TF.cross_entropy(tl, torch.from_numpy(labels), label_smoothing=smoothing)
    want.backward()
    loss, grad = F.cross_entropy(logits, labels, smoothing)
    assert isinstance(loss, float)
    assert abs(loss - want.item()) <= {np.float32: 1e-6, np.float64: 1e-12}[dtype] * abs(want.item())
    assert_close(grad, tl.grad.numpy())


def test_cross_entropy_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        F.cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        F.cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))


# --- whole networks ---------------------------------------------------------------------------

TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}
# A small network of the real kind (bottleneck, grouped 3x3) for float32 train-mode checks. In the
# deep nets at small inputs, train-mode float32 gradients are off by 1-40% in torch and npresnet
# alike, by chance: float32 rounding, amplified ~1000x by the batch norms on the way to layer4, moves
# a few pre-ReLU values that lie within 1e-4 of 0 across it; the ReLU's gradient jumps there, and with
# 8 values a channel in layer4 one flipped value moves that channel's gradients by up to 40%.
# (resnext50_32x4d, 2x3x48x48, 8 inputs: 2-6 flipped ReLUs per input in each library, largest
# errors 2e-2 to 4e-1 in each; npresnet's ops are as accurate as torch's, README "Fine-tuning".)
TINY_RESNEXT = ResNetSpec("tiny_resnext", BOTTLENECK, (1, 1, 1, 1), groups=4, width_per_group=16, num_classes=10)


@functools.lru_cache(maxsize=1)
def oracle(spec: ResNetSpec):
    """A float64 torch model with random weights and batch-norm statistics, and its state dict (cached)."""
    model = randomise(torch_resnet(spec), seed=0).double()
    return model, numpy_state_dict(model)


def oracle_state(spec: ResNetSpec):
    return oracle(spec)[1]


def run_torch(spec, x, labels, training, dtype, frozen_modules=(), label_smoothing=0.0):
    model = copy.deepcopy(oracle(spec)[0]).to(TORCH_DTYPES[dtype]).train(training)
    for name in frozen_modules:
        module = getattr(model, name)
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    logits = model(t(x))
    loss = TF.cross_entropy(logits, torch.from_numpy(labels), label_smoothing=label_smoothing)
    loss.backward()
    grads = {k: p.grad.numpy() for k, p in model.named_parameters() if p.requires_grad}
    stats = {k: v for k, v in numpy_state_dict(model).items() if not k.endswith(("weight", "bias"))}
    return loss.item(), grads, logits.detach().numpy(), stats


def compare(spec, shape, training, dtype, freeze=None, label_smoothing=0.0, backend="numpy"):
    """value_and_grad against torch autograd: loss, logits, every gradient, running statistics
    and num_batches_tracked after the pass."""
    state = oracle_state(spec)
    if dtype != np.float64:
        state = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in state.items()}
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    labels = np.random.default_rng(2).integers(0, spec.num_classes, shape[0])
    stages = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    frozen_modules = () if freeze is None else stages[: stages.index("layer1" if freeze == "stem" else freeze) + (freeze != "stem")]
    want_loss, want_grads, want_logits, want_state = run_torch(
        spec, x, labels, training, dtype, frozen_modules, label_smoothing
    )
    model = npresnet.build(spec, state, backend=backend).train(training).freeze(freeze)
    loss, grads, logits = npresnet.value_and_grad(model, x, labels, label_smoothing=label_smoothing, return_logits=True)
    assert isinstance(loss, float)
    assert abs(loss - want_loss) <= 1e-12 + {np.float32: 1e-5, np.float64: 1e-12}[dtype] * abs(want_loss)
    assert_close(logits, want_logits)
    assert list(grads) == list(want_grads)  # exactly the trainable parameters, in torch's order
    errors = {k: assert_close(grads[k], want_grads[k]) for k in want_grads}
    got_state = model.state_dict()
    assert set(got_state) == set(want_state) | set(model.parameters(trainable=False))
    for key, want in want_state.items():
        if key.endswith("num_batches_tracked"):
            assert int(got_state[key]) == int(want), key
        elif "running" in key:
            assert_close(got_state[key], want)
    return errors


# TorchVision's widths for one network of each block kind; every other architecture at a quarter of
# them. The backward pass is the same code whatever the channel count: what an architecture adds is
# its depth, block, groups and width ratio, which the narrow spec keeps (ResNeXt's 32 or 64 groups
# too, at 1 to 8 channels each). All at full width took 3.5 minutes and 6 GB of memory in float64;
# bench/grad_accuracy.py measures every architecture at full width, and tests/test_model.py checks
# every full-width architecture's forward pass against torch.
FULL_WIDTH = ("resnet18", "resnet50")
NARROW_PLANES = (16, 32, 64, 128)


def grad_spec(arch: str) -> ResNetSpec:
    """`arch` with 10 classes, at TorchVision's widths (FULL_WIDTH) or a quarter of them."""
    spec = get_spec(arch, num_classes=10)
    return spec if arch in FULL_WIDTH else spec.replace(name=f"narrow_{arch}", planes=NARROW_PLANES)


# 48x48: layer4 maps 2x2, so train-mode batch norm sees 8 values per channel. With 1x1 maps and
# 2 images train mode is so ill-conditioned that even float64 loses digits (resnet101 at 32x32:
# gradients 4e-5 apart between torch and npresnet, losses 2e-7, both in float64), so the tiny
# inputs check eval mode only. bench/grad_accuracy.py measures train mode for every architecture.
FAMILY_SHAPE = (2, 3, 48, 48)
TINY_SHAPE = (1, 3, 16, 16)  # layer3 and layer4 maps 1x1
# The deepest and widest repeat their shallower siblings' blocks (whose train mode is tested at
# FAMILY_SHAPE); checked at TINY_SHAPE to keep the suite's time and memory small.
DEEPEST = ("resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in DEEPEST])
def test_every_architecture_float64(arch, training):
    compare(grad_spec(arch), FAMILY_SHAPE, training, np.float64)


@pytest.mark.parametrize("arch", DEEPEST)
def test_deepest_architectures_float64_eval_mode(arch):
    compare(grad_spec(arch), TINY_SHAPE, False, np.float64)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_architectures_float32_eval(arch):
    compare(grad_spec(arch), FAMILY_SHAPE, False, np.float32)


@pytest.mark.parametrize("spec", [get_spec("resnet18", num_classes=10), TINY_RESNEXT], ids=lambda s: s.name)
def test_float32_train_mode(spec):
    compare(spec, FAMILY_SHAPE, True, np.float32, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_cifar_stem(dtype):
    compare(get_spec("resnet18", num_classes=10, stem="cifar"), (2, 3, 12, 12), True, dtype)  # layer4: 2x2


@pytest.mark.parametrize("freeze", ["stem", "layer2", "layer4"])
def test_frozen_stages_match_torch_without_their_gradients(freeze):
    """Frozen stages get no gradient and keep their running statistics; torch: requires_grad=False and eval()."""
    spec = get_spec("resnet18", num_classes=10)
    errors = compare(spec, FAMILY_SHAPE, True, np.float64, freeze=freeze)
    assert "fc.weight" in errors
    assert ("conv1.weight" in errors) is False
    assert ("layer3.0.conv1.weight" in errors) == (freeze != "layer4")


@pytest.mark.parametrize(
    "spec, dtype, freeze",
    [
        (get_spec("resnet18", num_classes=10), np.float64, None),
        (get_spec("resnet18", num_classes=10), np.float32, None),
        (TINY_RESNEXT, np.float32, None),
        (get_spec("resnet18", num_classes=10), np.float64, "layer1"),
    ],
    ids=["resnet18-f64", "resnet18-f32", "tiny_resnext-f32", "resnet18-f64-frozen"],
)
def test_numba_backend_trains_on_its_compiled_ops(spec, dtype, freeze):
    """value_and_grad on a numba model runs npresnet_kernels.train's NHWC ops: torch's gradients all the same."""
    pytest.importorskip("numba")
    from npresnet.autograd import training_ops

    model = npresnet.build(spec, backend="numba")
    assert type(training_ops(model.backend)).__name__ == "NumbaTrainingOps"
    compare(spec, FAMILY_SHAPE, True, dtype, freeze=freeze, label_smoothing=0.1, backend="numba")


def test_train_mode_updates_counts_and_refolds():
    """A train-mode pass changes the running statistics, so the next inference forward must use them."""
    model = npresnet.build("resnet18", oracle_state(get_spec("resnet18", num_classes=10)), backend="numpy")
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32))
    before = model(x)
    model.train()
    npresnet.value_and_grad(model, x, np.array([1, 2]))
    assert model.state_dict()["layer1.0.bn1.num_batches_tracked"] == 1
    after = model(x)
    fresh = npresnet.build("resnet18", model.state_dict(), backend="numpy")
    np.testing.assert_array_equal(after, fresh(x))
    assert not np.allclose(after, before)
    model.eval()
    npresnet.value_and_grad(model, x, np.array([1, 2]))
    np.testing.assert_array_equal(model(x), after)  # eval mode changes nothing
    assert model.state_dict()["layer1.0.bn1.num_batches_tracked"] == 1
