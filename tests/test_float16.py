"""float16 weight files: half the bytes, loaded as float32, logits within 1e-2 of the float32 file."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import npresnet  # noqa: E402
from helpers import assert_close  # noqa: E402
from image_files import photos  # noqa: E402
from npresnet.specs import get_spec  # noqa: E402
from torch_resnet import numpy_state_dict, randomise, torch_resnet  # noqa: E402


def trained_like_state(arch: str, num_classes: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """torch_resnet's random weights and batch-norm statistics, as a checkpoint would hold them (float32)."""
    return numpy_state_dict(randomise(torch_resnet(get_spec(arch, num_classes=num_classes)), seed))


def stored(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_half_the_bytes_and_logits_within_1e_2(arch, tmp_path):
    model = npresnet.build(arch, trained_like_state(arch), backend="numpy")
    npresnet.save(model, tmp_path / "f32.npz")
    npresnet.save(model, tmp_path / "f16.npz", dtype="float16")
    ratio = (tmp_path / "f16.npz").stat().st_size / (tmp_path / "f32.npz").stat().st_size
    assert 0.49 < ratio < 0.51, ratio

    arrays = stored(tmp_path / "f16.npz")
    assert arrays["layer1.0.conv1.weight"].dtype == np.float16 and arrays["fc.weight"].dtype == np.float16
    assert arrays["bn1.running_var"].dtype == np.float32 and arrays["fc.bias"].dtype == np.float32
    assert json.loads(str(arrays["__meta__"]))["stored_dtype"] == "float16"

    half = npresnet.load(tmp_path / "f16.npz", backend="numpy")
    assert half.meta["stored_dtype"] == "float16"
    parameters = {k: v for k, v in half.state_dict().items() if not k.endswith("num_batches_tracked")}  # int64 counts
    assert {v.dtype for v in parameters.values()} == {np.dtype(np.float32)}
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    got = half(x)
    assert got.dtype == np.float32
    want = model(x)
    error = assert_close(got, want, tol=1e-2)
    assert error > 0  # the weights really were rounded


def test_loads_everywhere_a_float32_file_does(tmp_path, cli):
    state = trained_like_state("resnet18", num_classes=10)
    f16 = tmp_path / "f16.npz"
    npresnet.save(npresnet.build("resnet18", state, backend="numpy"), f16, dtype="float16")
    reference = npresnet.load(f16, backend="numpy")
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    for model in (npresnet.resnet18(weights=f16, backend="numpy"), npresnet.build("resnet18", str(f16), backend="numpy")):
        np.testing.assert_array_equal(model(x), reference(x))
    top = npresnet.classify(photos()[:1], reference, topk=1)[0][0]

    result = cli("classify", "--weights", f16, "--json", "--topk", 1, photos()[0])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["top"][0]["index"] == top.index

    result = cli("info", f16)
    assert result.returncode == 0 and "float16, float32" in result.stdout and "stored_dtype: float16" in result.stdout

    # Saved again without a dtype, the float32 parameters are written as they are, and the metadata says nothing else.
    npresnet.save(reference, tmp_path / "again.npz")
    arrays = stored(tmp_path / "again.npz")
    assert arrays["conv1.weight"].dtype == np.float32 and "stored_dtype" not in json.loads(str(arrays["__meta__"]))


def test_cli_convert_pth_to_float16(tmp_path, cli):
    tmodel = randomise(torch_resnet(get_spec("resnet18", num_classes=10)), seed=3)
    torch.save(tmodel.state_dict(), tmp_path / "finetuned.pth")
    result = cli("convert", tmp_path / "finetuned.pth", tmp_path / "small.npz", "--dtype", "float16")
    assert result.returncode == 0, result.stderr
    assert "weights stored as float16" in result.stdout
    arrays = stored(tmp_path / "small.npz")
    assert arrays["layer4.1.conv2.weight"].dtype == np.float16
    x = np.random.default_rng(4).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = tmodel(torch.from_numpy(x)).numpy()
    assert_close(npresnet.load(tmp_path / "small.npz", backend="numpy")(x), want, tol=1e-2)

    # And back: float16 in, float32 out; the stored dtype is the new file's, not the source's.
    result = cli("convert", tmp_path / "small.npz", tmp_path / "wide.npz")
    assert result.returncode == 0, result.stderr
    arrays = stored(tmp_path / "wide.npz")
    assert arrays["layer4.1.conv2.weight"].dtype == np.float32
    assert "stored_dtype" not in json.loads(str(arrays["__meta__"]))


def test_weights_beyond_float16_are_an_error(tmp_path):
    state = npresnet.build("resnet18", num_classes=10, backend="numpy").state_dict()
    state["layer3.0.conv2.weight"][0, 0, 0, 0] = 1e6
    with pytest.raises(npresnet.WeightsError, match=r"layer3\.0\.conv2\.weight: values out of float16's range"):
        npresnet.save(npresnet.build("resnet18", state, backend="numpy"), tmp_path / "f16.npz", dtype="float16")
    assert list(tmp_path.iterdir()) == []
