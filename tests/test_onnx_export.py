"""ONNX export: onnxruntime runs the exported graph and gives npresnet's outputs, for every architecture.

npresnet is checked against torch elsewhere (test_model.py); here the exported file is checked against
npresnet: logits within 1e-4 of the largest logit, feature maps likewise, with random weights and random
batch-norm statistics so that a wrong fold or a mis-wired graph cannot pass.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import npresnet  # noqa: E402
from helpers import assert_close  # noqa: E402
from npresnet.onnx_export import build_onnx_model, serialize_checked  # noqa: E402
from npresnet.specs import ARCHITECTURES, ResNetSpec, get_spec, parameter_shapes  # noqa: E402

# TorchVision's ImageNet normalisation (transforms/_presets.py), written out here rather than read from npresnet.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def random_state(arch: str | ResNetSpec, num_classes: int = 1000, seed: int = 0, stem: str = "imagenet") -> dict[str, np.ndarray]:
    """Random weights and batch-norm statistics (the scales of torch_resnet.randomise), in NumPy: fast for the big models."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in parameter_shapes(get_spec(arch, num_classes=num_classes, stem=stem)).items():
        n = shape[0]
        if len(shape) == 4:
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[1:])))
        elif key == "fc.weight":
            value = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, n)
        elif key.endswith("running_mean") or key.endswith("bias"):
            value = rng.standard_normal(n) * 0.1
        else:  # batch-norm weight
            value = rng.uniform(0.25, 0.75, n)
        state[key] = value.astype(np.float32)
    return state


def session(model_bytes: bytes, optimize: bool = False) -> "ort.InferenceSession":
    """An onnxruntime session; without `optimize`, the graph runs as exported (and loads faster)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_onnx(sess, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input": x})))


def images(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# TorchVision's widths for one network of each block kind, a quarter of them for the others: the graph
# (its nodes, their names and wiring) is the same at any width, and the widths only make the initializers
# larger (wide_resnet101_2's 0.5 GB took 30 s and 2.5 GB of memory to export, check and load).
FULL_WIDTH = ("resnet18", "resnet50")


def export_spec(arch: str) -> ResNetSpec:
    spec = get_spec(arch)
    return spec if arch in FULL_WIDTH else spec.replace(name=f"narrow_{arch}", planes=(16, 32, 64, 128))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_matches_npresnet(arch):
    spec = export_spec(arch)
    model = npresnet.build(spec, random_state(spec), backend="numpy")
    sess = session(serialize_checked(build_onnx_model(model)))
    x = images((1, 3, 32, 32))
    got = run_onnx(sess, x)
    assert list(got) == ["logits"]
    assert_close(got["logits"], model(x))


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_dynamic_batch_and_size_from_one_file(arch):
    model = npresnet.build(arch, random_state(arch, num_classes=10), backend="numpy")
    sess = session(serialize_checked(build_onnx_model(model)))
    for shape in [(1, 3, 32, 48), (3, 3, 64, 64)]:
        x = images(shape)
        assert_close(run_onnx(sess, x)["logits"], model(x))


def test_features_at_800x800_equal_model_features():
    model = npresnet.build("resnet18", random_state("resnet18"), backend="numpy")
    sess = session(serialize_checked(build_onnx_model(model, features=True)), optimize=True)
    assert [o.name for o in sess.get_outputs()] == ["logits", "layer1", "layer2", "layer3", "layer4"]
    x = images((1, 3, 800, 800))
    got = run_onnx(sess, x)
    want = model.features(x)
    for name, channels, stride in zip(["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512], [4, 8, 16, 32]):
        assert got[name].shape == (1, channels, 800 // stride, 800 // stride)
        assert_close(got[name], want[name])
    assert_close(got["logits"], model(x))


def test_cifar_stem():
    model = npresnet.build("resnet18", random_state("resnet18", num_classes=10, stem="cifar"), stem="cifar", backend="numpy")
    proto = build_onnx_model(model, features=True)
    assert "MaxPool" not in {node.op_type for node in proto.graph.node}
    got = run_onnx(session(serialize_checked(proto)), images((2, 3, 32, 32)))
    want = model.features(images((2, 3, 32, 32)))
    assert got["layer1"].shape == (2, 64, 32, 32)
    assert_close(got["layer4"], want["layer4"])


@pytest.mark.parametrize("opset", [13, 17])
def test_opsets(opset):
    model = npresnet.build("resnet18", random_state("resnet18", num_classes=10), backend="numpy")
    proto = build_onnx_model(model, opset=opset)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", opset)]
    assert {node.op_type for node in proto.graph.node} == {
        "Conv", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Flatten", "Gemm"
    }
    x = images((2, 3, 32, 32))
    assert_close(run_onnx(session(serialize_checked(proto)), x)["logits"], model(x))


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_fixed_batch_and_size():
    model = npresnet.build("resnet50", random_state("resnet50", num_classes=10), backend="numpy")
    proto = build_onnx_model(model, features=True, batch=2, size=(65, 97))
    graph = proto.graph
    assert dims(graph.input[0]) == [2, 3, 65, 97]
    # Odd sizes round up at each stride-2 step: 65 -> 33 (conv1) -> 17 (max pool) -> 9 -> 5 -> 3.
    assert {o.name: dims(o) for o in graph.output} == {
        "logits": [2, 10],
        "layer1": [2, 256, 17, 25],
        "layer2": [2, 512, 9, 13],
        "layer3": [2, 1024, 5, 7],
        "layer4": [2, 2048, 3, 4],
    }
    sess = session(serialize_checked(proto))
    x = images((2, 3, 65, 97))
    assert_close(run_onnx(sess, x)["layer2"], model.features(x)["layer2"])
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(None, {"input": images((1, 3, 65, 97))})


def test_dynamic_axes_and_metadata():
    model = npresnet.build("resnet18", random_state("resnet18"), backend="numpy")
    model.meta.update(crop_size=224, resize_size=232, weights="resnet18.IMAGENET1K_V1")
    proto = build_onnx_model(model)
    assert dims(proto.graph.input[0]) == ["batch", 3, "height", "width"]
    assert dims(proto.graph.output[0]) == ["batch", 1000]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["arch"] == "resnet18" and props["num_classes"] == "1000"
    assert json.loads(props["mean"]) == IMAGENET_MEAN and json.loads(props["std"]) == IMAGENET_STD
    assert (props["crop_size"], props["resize_size"]) == ("224", "232")
    assert props["weights"] == "resnet18.IMAGENET1K_V1"
    classes = json.loads(props["classes"])
    assert len(classes) == 1000 and classes[0] == "tench" and classes[281] == "tabby"
    assert "folded" in props["batch_norm"]
    assert proto.producer_name == "npresnet"
    # Initializers keep TorchVision's names: one folded weight and bias per conv + batch norm, then fc.
    names = {t.name for t in proto.graph.initializer}
    assert {"conv1.weight", "conv1.bias", "layer2.0.downsample.0.bias", "fc.weight", "fc.bias"} <= names
    assert not any("bn" in name for name in names)


def test_class_names_from_the_weights_metadata():
    model = npresnet.build("resnet18", random_state("resnet18", num_classes=3), backend="numpy")
    props = {p.key: p.value for p in build_onnx_model(model).metadata_props}
    assert json.loads(props["classes"]) == ["0", "1", "2"]
    model.meta["classes"] = ["cat", "dog", "bird"]
    props = {p.key: p.value for p in build_onnx_model(model).metadata_props}
    assert json.loads(props["classes"]) == ["cat", "dog", "bird"]


@pytest.mark.parametrize(
    "options, words",
    [
        ({"opset": 12}, "opset must be an integer from 13"),
        ({"batch": 0}, "batch must be a positive integer"),
        ({"size": (224,)}, "size must be (height, width)"),
        ({"size": (224, -1)}, "two positive integers"),
    ],
    ids=["opset", "batch", "size-one-value", "size-negative"],
)
def test_bad_options(options, words, tmp_path):
    model = npresnet.build("resnet18", num_classes=3, backend="numpy")
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        npresnet.export_onnx(model, tmp_path / "out.onnx", **options)
    assert list(tmp_path.iterdir()) == []


# --- the command --------------------------------------------------------------------------------------------------


def run_cli_without(blocked, *args):
    """The command in a process of its own in which importing the `blocked` packages fails."""
    code = (
        "import sys\n"
        "class Blocker:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {set(blocked)!r}:\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "from npresnet.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet18_10.npz"
    npresnet.save(npresnet.build("resnet18", random_state("resnet18", num_classes=10), backend="numpy"), path)
    return path


def test_cli_export_end_to_end(weights, tmp_path, cli):
    out = tmp_path / "backbone.onnx"
    result = cli("export", weights, out, "--features", "--opset", 13, "--size", 96, 128)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{out}: resnet18, ") and "opset 13" in result.stdout
    assert result.stdout.rstrip().endswith("outputs logits, layer1, layer2, layer3, layer4; batch norm folded")
    onnx.checker.check_model(str(out), full_check=True)
    assert [p.name for p in tmp_path.iterdir()] == ["backbone.onnx"]  # no temporary file left behind
    model = npresnet.load(weights, backend="numpy")
    x = images((2, 3, 96, 128))
    got = run_onnx(session(str(out), optimize=True), x)
    assert_close(got["logits"], model(x))
    assert_close(got["layer3"], model.features(x)["layer3"])


def test_cli_export_of_an_int8_file_says_what_it_wrote(tmp_path, cli):
    """An int8 file has no batch norm to fold (quantizing folded it): the line names the QDQ graph instead."""
    model = npresnet.build("resnet18", random_state("resnet18", num_classes=10), backend="numpy")
    int8 = npresnet.quantize(model, images((2, 3, 32, 32)), samples=2)
    npresnet.save(int8, tmp_path / "int8.npz")
    out = tmp_path / "int8.onnx"
    result = cli("export", tmp_path / "int8.npz", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("outputs logits; int8 QDQ (QuantizeLinear/DequantizeLinear around each Conv and Gemm)")
    assert "folded" not in result.stdout
    ops = {node.op_type for node in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops and "BatchNormalization" not in ops


@pytest.mark.parametrize(
    "args, words",
    [
        (["--size", "800"], "--size takes HEIGHT WIDTH (two positive integers) or dynamic, not '800'"),
        (["--size", "0", "8"], "--size takes HEIGHT WIDTH"),
        (["--opset", "7"], "opset must be an integer from 13"),
    ],
    ids=["size-one-value", "size-zero", "opset"],
)
def test_cli_bad_options(weights, tmp_path, args, words, cli):
    out = tmp_path / "out.onnx"
    result = cli("export", weights, out, *args)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("npresnet: error: ") and words in lines[0], result.stderr
    assert not out.exists()


def test_cli_without_the_onnx_package(weights, tmp_path):
    out = tmp_path / "out.onnx"
    result = run_cli_without({"onnx"}, "export", weights, out)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("npresnet: error: ") and 'pip install "npresnet[onnx]"' in lines[0]
    assert not out.exists()
