"""INT8: the quantize/dequantize semantics against ONNX's, each calibration method, and a really trained model.

The trained model (tests/digits.py): TorchVision's resnet18 with the CIFAR stem, trained with torch for
two epochs on scikit-learn's digits (8x8 grey images as RGB, 10 classes), exported to npresnet by its
state dict. Its held-out accuracy is what int8 must keep (within 1 point), and its files what int8 must shrink.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("sklearn.datasets")

import digits  # noqa: E402
from helpers import Background, run_cli  # noqa: E402

import npresnet  # noqa: E402
from npresnet import functional as F  # noqa: E402
from npresnet.quantization import (  # noqa: E402
    HISTOGRAM_BINS,
    INT8,
    UINT8,
    QuantizedResNet,
    TensorObserver,
    entropy_bins,
    fake_quantize,
    quantize_weight,
)
from npresnet.specs import get_spec  # noqa: E402
from npresnet.weights import WeightsError, load_npz, save_npz  # noqa: E402

CALIBRATION = digits.CALIBRATION

# torch's half a minute of training, in a process of its own started with the session (tests/conftest.py).
BACKGROUND = {"trained": Background([os.path.join("tests", "digits.py")], folder=True, heavy=True)}  # torch: ~1 GB


@pytest.fixture(scope="module")
def trained():
    """A resnet18 trained on digits (tests/digits.py): its float32 .npz, calibration PNGs, held-out (x, y)."""
    run = BACKGROUND["trained"]
    done = run.wait(timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"\ntrained fixture: {done.stdout.strip()}")
    return digits.result(run.folder)


@pytest.fixture(scope="module")
def int8_files(trained):
    """method -> the int8 file `npresnet quantize` wrote for it, calibrated on the PNG folder."""
    files = {}
    for method in ("minmax", "percentile", "entropy"):
        files[method] = trained["float"].parent / f"digits_int8_{method}.npz"
        result = run_cli("quantize", trained["float"], "--calibrate", trained["calibration"], "--method", method,
                     "--samples", CALIBRATION, "-o", files[method])
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
    return files


def accuracy(model, x, y) -> float:
    return float(np.mean(model(x).argmax(axis=1) == y))


@pytest.fixture(scope="module")
def float32_accuracy(trained) -> float:
    """The trained float32 model's held-out accuracy (each int8 method is compared with it)."""
    return accuracy(npresnet.load(trained["float"], backend="numpy"), trained["x"], trained["y"])


# --- semantics: ONNX's QuantizeLinear / DequantizeLinear ---------------------------------------------------------

# x / scale for the crafted inputs (scale 0.5, so both are exact in float32): ties (x.5) must round to
# even, values beyond the type's range must saturate.
CRAFTED = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -127.5, -128.5, 254.5, 255.5,
                    500.0, -500.0, 0.0, -0.0, 3.0, -3.1, 0.49999997], dtype=np.float32)


def onnx_quantize_linear(runner: str, x, scale, zero_point, axis=1):
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    node = helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["y"], axis=axis)
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "scale"), numpy_helper.from_array(np.asarray(zero_point), "zero_point")]
    out_type = helper.np_dtype_to_tensor_dtype(np.asarray(zero_point).dtype)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", out_type, list(x.shape))], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    if runner == "onnx.reference":
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model).run(None, {"x": x})[0]
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("runner", ["onnx.reference", "onnxruntime"])
@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_quantize_linear_rounds_half_to_even_and_saturates_as_onnx(runner, dtype):
    x = CRAFTED * np.float32(0.5)
    expected = onnx_quantize_linear(runner, x, 0.5, dtype(0))
    got = F.quantize_linear(x, np.float32(0.5), dtype(0))
    assert got.dtype == expected.dtype == dtype
    np.testing.assert_array_equal(got, expected)
    # Pinned without the oracle too: 0.5 -> 0 and 2.5 -> 2 (ties to even), 500 saturates.
    assert got[0] == 0 and got[2] == 2 and got[12] == np.iinfo(dtype).max
    np.testing.assert_array_equal(fake_quantize(x, np.float32(0.5), np.dtype(dtype)),
                                  F.dequantize_linear(got, np.float32(0.5), dtype(0)))


@pytest.mark.parametrize("runner", ["onnx.reference", "onnxruntime"])
def test_per_channel_weight_quantization_as_onnx(runner):
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    weight[2] = 0  # an all-zero channel gets scale 1.0, not a division by zero
    q, scale = quantize_weight(weight)
    # 7-bit weights (WEIGHT_QMAX = 63: onnxruntime's int16 pair sums on AVX2 saturate with 8-bit ones).
    np.testing.assert_array_equal(scale[[0, 1, 3]], (np.abs(weight[[0, 1, 3]]).reshape(3, -1).max(1) / 63).astype(np.float32))
    assert scale[2] == 1.0
    assert np.abs(q).reshape(4, -1).max(1).tolist() == [63, 63, 0, 63]
    np.testing.assert_array_equal(q, onnx_quantize_linear(runner, weight, scale, np.zeros(4, np.int8), axis=0))


def test_rounding_rule_on_ties():
    got = F.quantize_linear(np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32), np.float32(1), np.int8(0))
    assert got.tolist() == [0, 2, 2, 0, -2, -2]


# --- calibration methods -----------------------------------------------------------------------------------------


def heavy_tailed(seed=0, n=200_000):
    x = np.random.default_rng(seed).laplace(scale=1.0, size=n).astype(np.float32)
    x[123] = 80.0  # one outlier: minmax spends its range on it
    return x


def test_minmax_scale_is_max_over_qmax_exactly():
    x = heavy_tailed()
    signed = TensorObserver(INT8)
    for part in np.array_split(x, 3):
        signed.observe(part)
    assert signed.scale("minmax") == np.float32(80.0 / 127)
    relu = TensorObserver(UINT8)
    relu.observe(x)
    assert relu.scale("minmax") == np.float32(80.0 / 255)
    x_neg = -np.abs(x)
    x_neg[7] = 0.5  # the only positive value: a uint8 quantizer sees nothing else (it saturates at 0)
    negative = TensorObserver(UINT8)
    negative.observe(x_neg)
    assert negative.scale("minmax") == np.float32(0.5 / 255)
    silent = TensorObserver(UINT8)
    silent.observe(np.zeros(10, np.float32))
    assert silent.scale("entropy") == silent.scale("minmax") == 1.0  # always zero: any scale, not a division by 0


def test_percentile_and_entropy_clip_the_tail():
    x = heavy_tailed()
    observer = TensorObserver(INT8)
    for part in np.array_split(np.random.default_rng(1).permutation(x), 4):
        observer.observe(part)
    assert observer.histogram.sum() == x.size
    minmax = observer.threshold("minmax")
    percentile = observer.threshold("percentile", 99.99)
    entropy = observer.threshold("entropy")
    # The histogram's bin edge at or above the true percentile, less than one bin above it.
    true = np.percentile(np.abs(x), 99.99)
    assert true <= percentile < true + observer.range / HISTOGRAM_BINS + 1e-6
    assert percentile < minmax and entropy < minmax
    assert observer.threshold("percentile", 100.0) == minmax
    # Entropy keeps the bulk: a Laplace(1)'s |x| exceeds 6 once in 400; the outlier's 80 is clipped.
    assert 6 < entropy < 40
    # ...and the clipped scale quantizes the bulk better than minmax's.
    def error(threshold):
        return float(np.mean((fake_quantize(x, np.float32(threshold / 127), INT8) - x)[np.abs(x) < 6] ** 2))

    assert error(entropy) < error(minmax) / 4


def naive_entropy_bins(hist, levels):
    """The definition in entropy_bins' docstring, one candidate at a time."""
    hist = hist.astype(np.float64)
    total = hist.sum()
    best, best_divergence = hist.size, np.inf
    for i in range(levels, hist.size + 1):
        kept = hist[:i]
        p = kept.copy()
        p[-1] += hist[i:].sum()
        p /= total
        q = np.zeros(i)
        for j in range(levels):
            lo, hi = j * i // levels, (j + 1) * i // levels
            nonzero = kept[lo:hi] > 0
            if nonzero.any():
                q[lo:hi][nonzero] = kept[lo:hi].sum() / nonzero.sum()
        q /= kept.sum()
        present = p > 0
        divergence = np.sum(p[present] * np.log(p[present] / np.where(q[present] > 0, q[present], 1e-4)))
        if divergence < best_divergence:
            best, best_divergence = i, divergence
    return best


@pytest.mark.parametrize("levels,bins,seed", [(128, 300, 0), (256, 400, 1)])
def test_entropy_bins_matches_the_one_candidate_loop(levels, bins, seed):
    rng = np.random.default_rng(seed)
    hist = np.histogram(np.abs(rng.laplace(size=20_000)), bins=bins)[0]
    hist[rng.integers(0, bins, 20)] = 0  # empty bins inside the range, as sparse activations have
    assert entropy_bins(hist, levels) == naive_entropy_bins(hist, levels)


# --- the trained model -------------------------------------------------------------------------------------------


def test_float_model_is_really_trained(float32_accuracy):
    assert float32_accuracy > 0.85  # chance is 0.1


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_int8_accuracy_within_one_point_of_float32(trained, int8_files, float32_accuracy, method):
    int8 = npresnet.load(int8_files[method])
    assert isinstance(int8, QuantizedResNet) and int8.meta["method"] == method and int8.meta["samples"] == CALIBRATION
    drop = float32_accuracy - accuracy(int8, trained["x"], trained["y"])
    print(f"\n{method}: int8 accuracy drop {drop * 100:.2f} points")
    assert drop <= 0.01


def test_int8_file_at_most_0_3x_the_float32_file(trained, int8_files):
    ratio = int8_files["minmax"].stat().st_size / trained["float"].stat().st_size
    print(f"\nint8 / float32 file size: {ratio:.3f}")
    assert ratio <= 0.3


def test_library_quantize_equals_the_command_and_round_trips(trained, int8_files, tmp_path):
    float32 = npresnet.load(trained["float"], backend="numpy")
    from_command = npresnet.load(int8_files["minmax"])
    # The command picks all 64 PNGs (fewer than --samples would warn); the library gets the same images
    # preprocessed, in the command's order (sorted paths: class folders, then file names).
    paths = sorted(trained["calibration"].rglob("*.png"))
    direct = npresnet.quantize(float32, [str(p) for p in paths], samples=CALIBRATION)
    for key, value in from_command.state_dict().items():
        np.testing.assert_array_equal(direct.state_dict()[key], value, err_msg=key)
    npresnet.save(direct, tmp_path / "again.npz")
    again = npresnet.load(tmp_path / "again.npz")
    x = trained["x"][:16]
    np.testing.assert_array_equal(again(x), direct(x))
    # One scale per tensor: a conv's input is the ReLU output the conv before it quantized.
    assert direct.convs["layer1.0.conv2"].input_scale == direct.convs["layer1.0.conv1"].output_scale
    assert direct.convs["layer2.0.downsample.0"].input_scale == direct.convs["layer2.0.conv1"].input_scale


def test_quantized_model_in_classify_embed_and_the_command(trained, int8_files):
    int8 = npresnet.load(int8_files["entropy"])
    images = list(np.repeat(np.round(datasets.load_digits().images[:3] / 16 * 255).astype(np.uint8)[..., None], 3, -1))
    top = npresnet.classify(images, int8, topk=2, labels=[str(i) for i in range(10)])
    assert [t[0].label for t in top] == ["0", "1", "2"]  # the first three digits of the set
    vectors = npresnet.embed(images, int8)
    assert vectors.shape == (3, 512) and vectors.dtype == np.float32
    png = next(trained["calibration"].rglob("*.png"))
    result = run_cli("classify", "--weights", int8_files["entropy"], "--topk", 1, png)
    assert result.returncode == 0 and f"({png.parent.name})" in result.stdout


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_onnxruntime_on_the_qdq_export_agrees_with_npresnet_int8(trained, int8_files, method, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = tmp_path / f"digits_int8_{method}.onnx"
    result = run_cli("export", int8_files[method], path)  # onnx.checker's full check runs before the file is written
    assert result.returncode == 0, result.stderr
    proto = onnx.load(path)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weights = {i.name: i for i in proto.graph.initializer}
    assert weights["layer1.0.conv1.weight_quantized"].data_type == onnx.TensorProto.INT8
    assert weights["layer1.0.conv1.bias_quantized"].data_type == onnx.TensorProto.INT32
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert fused.count("QLinearConv") == 20  # every conv of resnet18 runs as onnxruntime's int8 kernel
    int8 = npresnet.load(int8_files[method])
    ours = int8(trained["x"]).argmax(axis=1)
    theirs = session.run(None, {"input": trained["x"]})[0].argmax(axis=1)
    agreement = float(np.mean(ours == theirs))
    print(f"\n{method}: npresnet int8 and onnxruntime on the QDQ export agree on {agreement:.2%}")
    assert agreement >= 0.99


# --- bad input ---------------------------------------------------------------------------------------------------


def test_quantized_file_refused_where_it_cannot_run(int8_files, tmp_path):
    path = int8_files["minmax"]
    with pytest.raises(npresnet.BackendUnavailable, match="'numba' backend cannot run.*'numpy'"):
        npresnet.load(path, backend="numba")
    result = run_cli("classify", "--weights", path, "--backend", "cuda", path)
    assert result.returncode == 1 and "int8 quantized model" in result.stderr and "'numpy'" in result.stderr
    with pytest.raises(WeightsError, match="int8 quantized model"):
        npresnet.convert(path, tmp_path / "converted.npz")
    assert not (tmp_path / "converted.npz").exists()
    with pytest.raises(WeightsError, match="int8 quantized model"):
        npresnet.ResNet(get_spec("resnet18", num_classes=10, stem="cifar"), npresnet.load(path).state_dict())
    with pytest.raises(WeightsError, match="int8 weights for resnet18.*not resnet34"):
        npresnet.build("resnet34", path)
    result = run_cli("quantize", path, "--calibrate", tmp_path, "-o", tmp_path / "twice.npz")
    assert result.returncode == 1 and "already quantized" in result.stderr
    assert not (tmp_path / "twice.npz").exists()


def test_damaged_quantized_file_lists_every_problem(int8_files, tmp_path):
    state, meta = load_npz(int8_files["minmax"])
    del state["layer1.0.conv1.weight_scale"]
    state["fc.input_zero_point"] = np.int8(0)  # uint8 expected: the type of the tensor is its zero point's
    state["layer2.0.conv1.output_scale"] = np.float32(-1)
    save_npz(tmp_path / "damaged.npz", state, meta)
    with pytest.raises(WeightsError) as info:
        npresnet.load(tmp_path / "damaged.npz")
    message = str(info.value)
    assert "missing entry: layer1.0.conv1.weight_scale" in message
    assert "fc.input_zero_point: expected uint8 (), got int8 ()" in message
    assert "layer2.0.conv1.output_scale: scales must be positive" in message


def test_calibration_errors(trained, tmp_path):
    float32 = npresnet.load(trained["float"], backend="numpy")
    with pytest.raises(ValueError, match="no calibration images"):
        npresnet.quantize(float32, [])
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        npresnet.quantize(float32, trained["calibration_x"], method="kl")
    with pytest.warns(UserWarning, match="calibrating on 4 images, fewer than the 10 asked for"):
        npresnet.quantize(float32, trained["calibration_x"][:4], samples=10)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not an image")
    result = run_cli("quantize", trained["float"], "--calibrate", empty, "-o", tmp_path / "out.npz")
    assert result.returncode == 1 and "no image files to calibrate on" in result.stderr
    few = tmp_path / "few"
    few.mkdir()
    for png in sorted(trained["calibration"].rglob("*.png"))[:3]:
        (few / png.name).write_bytes(png.read_bytes())
    (few / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run_cli("quantize", trained["float"], "--calibrate", few, "--samples", 10, "-o", tmp_path / "few.npz")
    assert "has 4 images, fewer than --samples 10" in result.stderr
    assert "broken.png" in result.stderr  # reported, skipped; the other three calibrate
    assert result.returncode == 1 and npresnet.load(tmp_path / "few.npz").meta["samples"] == 3
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run_cli("quantize", trained["float"], "--calibrate", only_broken, "-o", tmp_path / "none.npz")
    assert result.returncode == 1 and "none.npz not written" in result.stderr
    assert not (tmp_path / "none.npz").exists() and not list(tmp_path.glob(".none.npz*"))
