"""Whole networks against the torch oracle: every architecture and backend, several sizes, float32 and float64.

One torch network is held at a time (the wide ones weigh hundreds of MB), and its outputs are
computed once for every backend compared with them: the grids below vary the architecture slowest.
"""
import copy
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import npresnet  # noqa: E402
from helpers import assert_close  # noqa: E402
from npresnet.specs import ARCHITECTURES, BASIC, BOTTLENECK, CIFAR_STEM, ResNetSpec, get_spec  # noqa: E402
from torch_resnet import numpy_state_dict, randomise, torch_resnet  # noqa: E402

# TorchVision's parameter counts, from its weights documentation (not from this code).
TORCHVISION_NUM_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
}

DTYPES = {"f32": (np.float32, torch.float32), "f64": (np.float64, torch.float64)}


_ORACLE = {}  # one torch network at a time: (arch, num_classes, stem, seed) -> (network, state)


def oracle(arch: str, num_classes: int = 1000, stem: str = "imagenet", seed: int = 0):
    """(torch network with random weights and statistics, its state dict as NumPy arrays sharing its memory).

    randomise draws float32 values, so the float64 copies the tests make hold the very same numbers.
    The previous network is let go before the next is built (an lru_cache would hold both at once).
    """
    key = (arch, num_classes, stem, seed)
    if key not in _ORACLE:
        _ORACLE.clear()
        reference.cache_clear()
        spec = get_spec(arch, num_classes=num_classes, stem=stem)
        model = randomise(torch_resnet(spec), seed)
        _ORACLE[key] = model, {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return _ORACLE[key]


@pytest.fixture(scope="module", autouse=True)
def _let_go_of_the_oracle():
    yield
    _ORACLE.clear()


@functools.lru_cache(maxsize=4)
def reference(arch: str, shape: tuple, dtype_id: str, num_classes: int = 1000, stem: str = "imagenet", seed: int = 0):
    """(input, torch's features, torch's logits) in the dtype, for a seeded input of `shape`."""
    np_dtype, torch_dtype = DTYPES[dtype_id]
    tmodel, _ = oracle(arch, num_classes, stem, seed)
    net = tmodel if torch_dtype == torch.float32 else copy.deepcopy(tmodel).to(torch_dtype)
    x = np.random.default_rng(seed + 1).standard_normal(shape).astype(np_dtype)
    with torch.no_grad():
        features = {k: v.numpy() for k, v in net.features(torch.from_numpy(x)).items()}
        logits = net.fc(torch.from_numpy(features["pool"])).numpy()
    return x, features, logits


def compare(arch, shape, dtype_id, num_classes=1000, stem="imagenet", backend="numpy", seed=0):
    np_dtype, _ = DTYPES[dtype_id]
    _, state = oracle(arch, num_classes, stem, seed)
    x, want_features, want_logits = reference(arch, shape, dtype_id, num_classes, stem, seed)
    state = {k: v.astype(np_dtype, copy=False) if v.dtype.kind == "f" else v for k, v in state.items()}
    # The oracle's arrays as they are (copy=False; build copies a state dict): the widest networks' weights
    # are held twice (with the folded ones) rather than three times.
    model = npresnet.ResNet(get_spec(arch, num_classes=num_classes, stem=stem), state, backend=backend, copy=False)
    errors = {"logits": assert_close(model(x), want_logits)}
    got_features = model.features(x)
    assert list(got_features) == list(npresnet.FEATURE_NAMES)
    for name, want in want_features.items():
        errors[name] = assert_close(got_features[name], want)
    return errors


BACKENDS = ["numpy", "numba"]
# float32 on every architecture; float64 where its copies of the weights stay small. The deeper and
# wider members run the same code with other numbers of blocks and channels (and are checked in float32).
F64_ARCHS = {arch for arch, spec in ARCHITECTURES.items() if npresnet.count_params(spec) < 50_000_000}
ARCH_DTYPES = [(arch, dtype_id) for arch in ARCHITECTURES for dtype_id in DTYPES if dtype_id == "f32" or arch in F64_ARCHS]
# The numba backend picks its path per convolution from the kernel, stride, groups and map size, never
# from the depth: one network of each block kind and width ratio takes every path, and the deeper
# members (resnet34, 101, 152, the 101-layer ResNeXts and wide_resnet101_2) repeat their blocks.
NUMBA_ARCHS = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2")
ARCH_DTYPE_BACKENDS = [
    (arch, dtype_id, backend)
    for arch, dtype_id in ARCH_DTYPES
    for backend in BACKENDS
    if backend == "numpy" or arch in NUMBA_ARCHS
]


@pytest.mark.parametrize("arch, dtype_id, backend", ARCH_DTYPE_BACKENDS)
def test_every_architecture_matches_torch(arch, dtype_id, backend):
    """Every backend's whole model against torch. At 64x64 (batch 2, still a 2x2 layer4) the numba
    backend takes each of its paths: Winograd F(4x4) on layer1, F(2x2) on layer2, GEMMs below, im2col
    for the stem, strided and grouped convolutions."""
    if backend != "numpy":
        pytest.importorskip(backend)
    compare(arch, (2, 3, 64, 64), dtype_id, backend=backend)


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize(
    "shape",
    [(1, 3, 224, 224), (3, 3, 97, 131), (2, 3, 32, 32), (1, 3, 1, 1), (1, 3, 33, 17)],
    ids=lambda s: "N{}_{}x{}".format(s[0], *s[2:]),
)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_input_sizes_match_torch(arch, shape, dtype_id):
    compare(arch, shape, dtype_id)


@pytest.mark.parametrize("dtype_id", list(DTYPES))
def test_large_input_matches_torch(dtype_id):
    compare("resnet18", (1, 3, 512, 512), dtype_id)  # past 224 and 448; 800 proved no more at 2.4x the cost


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_cifar_stem_matches_torch(arch, dtype_id):
    compare(arch, (2, 3, 32, 32), dtype_id, num_classes=10, stem=CIFAR_STEM)


# Small networks are specs too: stage widths other than TorchVision's 64..512, each block kind.
SMALL_SPECS = {
    "basic": ResNetSpec("custom", BASIC, (1, 2, 1, 1), num_classes=5, planes=(8, 16, 24, 32)),
    "grouped_bottleneck": ResNetSpec(
        "custom", BOTTLENECK, (2, 1, 1, 1), groups=4, width_per_group=32, num_classes=5, planes=(4, 8, 8, 16)
    ),
}


@pytest.mark.parametrize("spec_id", list(SMALL_SPECS))
def test_small_specs_match_torch_and_are_inferred_from_their_weights(spec_id):
    spec = SMALL_SPECS[spec_id]
    tmodel = randomise(torch_resnet(spec), seed=3).double()
    state = numpy_state_dict(tmodel)
    model = npresnet.ResNet.from_state_dict(state, backend="numpy")
    assert model.spec == spec  # planes, groups and widths read back from the shapes
    x = np.random.default_rng(4).standard_normal((2, 3, 29, 35))
    with torch.no_grad():
        want = tmodel(torch.from_numpy(x)).numpy()
    assert_close(model(x), want)
    assert model.num_params == sum(p.numel() for p in tmodel.parameters())


@pytest.mark.parametrize("num_classes", [1, 10, 37])
def test_any_num_classes(num_classes):
    compare("resnet18", (2, 3, 40, 40), "f32", num_classes=num_classes)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_num_params_match_torchvision(arch):
    assert npresnet.count_params(get_spec(arch)) == TORCHVISION_NUM_PARAMS[arch]
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = torch_resnet(get_spec(arch))
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_NUM_PARAMS[arch]


def test_model_num_params_and_state_dict_keys():
    tmodel, state = oracle("resnet18")
    model = npresnet.resnet18(state)
    assert model.num_params == 11_689_512
    assert list(model.state_dict()) == list(state)  # torch's keys in torch's order, num_batches_tracked included
    for key in ("conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight", "fc.bias"):
        np.testing.assert_array_equal(model.state_dict()[key], state[key])


@pytest.mark.parametrize("dtype_id", list(DTYPES))
def test_output_dtype_follows_input(dtype_id):
    np_dtype, _ = DTYPES[dtype_id]
    model = npresnet.resnet18(num_classes=5)
    x = np.zeros((1, 3, 16, 16), dtype=np_dtype)
    assert model(x).dtype == np_dtype
    assert all(v.dtype == np_dtype for v in model.features(x).values())


def test_feature_shapes_and_strides():
    model = npresnet.resnet50(num_classes=3)
    feats = model.features(np.zeros((2, 3, 64, 96), dtype=np.float32))
    assert feats["stem"].shape == (2, 64, 32, 48)
    assert feats["layer1"].shape == (2, 256, 16, 24)
    assert feats["layer2"].shape == (2, 512, 8, 12)
    assert feats["layer3"].shape == (2, 1024, 4, 6)
    assert feats["layer4"].shape == (2, 2048, 2, 3)
    assert feats["pool"].shape == (2, 2048)


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.zeros((1, 3, 8, 8), dtype=np.int64), TypeError),
        (np.zeros((1, 3, 8, 8), dtype=np.float16), TypeError),
        (np.zeros((3, 8, 8), dtype=np.float32), ValueError),
        (np.zeros((1, 4, 8, 8), dtype=np.float32), ValueError),
        (np.zeros((0, 3, 8, 8), dtype=np.float32), ValueError),
        ([[1.0]], TypeError),
    ],
    ids=["int", "float16", "3d", "4-channels", "empty", "list"],
)
def test_bad_input_is_a_clear_error(bad, error):
    model = npresnet.resnet18(num_classes=2)
    with pytest.raises(error, match="input"):
        model(bad)
