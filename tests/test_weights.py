"""State-dict validation, the .npz format, and architecture inference."""
import numpy as np
import pytest

import npresnet
from npresnet.model import random_state_dict
from npresnet.specs import ARCHITECTURES, CIFAR_STEM, get_spec, infer_spec, parameter_shapes
from npresnet.weights import META_KEY, WeightsError, load_npz, save_npz


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("num_classes, stem", [(1000, "imagenet"), (10, CIFAR_STEM)])
def test_infer_spec_from_shapes(arch, num_classes, stem):
    spec = get_spec(arch, num_classes=num_classes, stem=stem)
    assert infer_spec(parameter_shapes(spec)) == spec


def test_save_load_roundtrip(tmp_path):
    model = npresnet.resnet18(num_classes=7)
    path = tmp_path / "m.npz"
    npresnet.save(model, path)
    loaded = npresnet.load(path)
    assert loaded.spec == model.spec
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k], v)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), model(x))
    assert loaded.meta["arch"] == "resnet18" and loaded.meta["num_classes"] == 7
    with np.load(path, allow_pickle=False) as f:  # loadable with pickle off, metadata included
        assert META_KEY in f.files


def test_constructor_accepts_path_and_infers_num_classes(tmp_path):
    npresnet.save(npresnet.resnet50(num_classes=3), tmp_path / "r50.npz")
    model = npresnet.resnet50(weights=tmp_path / "r50.npz")
    assert model.num_classes == 3
    with pytest.raises(WeightsError, match="fc.weight"):
        npresnet.resnet50(weights=tmp_path / "r50.npz", num_classes=1000)
    with pytest.raises(WeightsError, match="r50.npz holds weights for resnet50, not resnet18"):
        npresnet.resnet18(weights=tmp_path / "r50.npz")


def test_validation_reports_every_problem_at_once():
    state = random_state_dict(get_spec("resnet18"))
    del state["layer1.0.bn1.running_mean"]
    del state["fc.bias"]
    state["layer9.0.conv1.weight"] = np.zeros((1,), np.float32)
    state["layer2.0.downsample.0.weight"] = np.zeros((128, 64, 3, 3), np.float32)
    state["bn1.num_batches_tracked"] = np.array(5)  # ignored
    with pytest.raises(WeightsError) as info:
        npresnet.resnet18(state)
    message = str(info.value)
    assert "missing key: layer1.0.bn1.running_mean (expected shape (64,))" in message
    assert "missing key: fc.bias" in message
    assert "unexpected key: layer9.0.conv1.weight" in message
    assert "shape mismatch: layer2.0.downsample.0.weight: expected (128, 64, 1, 1), got (128, 64, 3, 3)" in message
    assert "num_batches_tracked" not in message


def test_num_batches_tracked_shapes_are_ignored():
    state = random_state_dict(get_spec("resnet18", num_classes=2))
    state["bn1.num_batches_tracked"] = np.array(3, dtype=np.int64)
    state["layer1.0.bn1.num_batches_tracked"] = np.array([3], dtype=np.int64)
    assert npresnet.resnet18(state).num_classes == 2


def test_non_resnet_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(WeightsError, match="other.npz.*conv1.weight"):
        npresnet.load(path)


def test_garbage_and_missing_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(WeightsError, match="bad.npz"):
        npresnet.load(bad)
    with pytest.raises(WeightsError, match="no such file"):
        npresnet.load(tmp_path / "absent.npz")


def test_pickled_npz_is_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, **{"conv1.weight": np.array([object()], dtype=object)})
    with pytest.raises(WeightsError, match="pickled.npz"):
        npresnet.load(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.npz"
    path.write_bytes(b"previous contents")

    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_npz(path, {"a": np.zeros(2)})
    assert path.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


def test_float64_weights_stay_float64():
    state = random_state_dict(get_spec("resnet18", num_classes=4), dtype=np.float64)
    model = npresnet.resnet18(state)
    assert model.state_dict()["conv1.weight"].dtype == np.float64


def test_text_file_named_npz_is_not_a_valid_weights_file(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("my notes")
    with pytest.raises(WeightsError, match=r"notes.npz: not a valid weights file: not a zip archive") as info:
        npresnet.load(path)
    assert "pickle" not in str(info.value)  # numpy's own loader suggests allow_pickle here


def test_metadata_schema(tmp_path):
    """What npresnet and its tools write loads back; a malformed value is refused at save and at load."""
    state = {"conv1.weight": np.ones((2, 3), np.float32)}
    meta = {"arch": "resnet18", "num_classes": 2, "stem": "cifar", "crop_size": 32, "resize_size": 36,
            "classes": ["cat", "dog"], "dtype": "float16", "stored_dtype": "float16", "quantized": True,
            "source_sha256": "0" * 64, "learning_rate": 0.01, "history": [0.5, 0.25], "note": None}
    save_npz(tmp_path / "ok.npz", state, meta)
    got, got_meta = load_npz(tmp_path / "ok.npz")
    # stored_dtype says what the file holds, so save_npz writes it only with its own dtype= (tests/test_float16.py).
    assert got_meta == {k: v for k, v in meta.items() if k != "stored_dtype"}
    got["conv1.weight"][0, 0] = 5  # writable, as np.load's arrays are
    for bad in ({"crop_size": "224"}, {"crop_size": 0}, {"classes": [1, 2]}, {"arch": "resnet19"}, {"quantized": 1},
                {"extra": [[[1]]]}):
        with pytest.raises(WeightsError, match=rf"bad.npz \(not written\): malformed __meta__: {next(iter(bad))}"):
            save_npz(tmp_path / "bad.npz", state, bad)
        assert not (tmp_path / "bad.npz").exists()
    np.savez(tmp_path / "foreign.npz", a=np.zeros(1), __meta__=np.array('{"resize_size": [1]}'))
    with pytest.raises(WeightsError, match=r"foreign.npz: malformed __meta__: resize_size must be a positive integer"):
        npresnet.load(tmp_path / "foreign.npz")


def test_old_imports_still_work():
    from npresnet.formats import convert, read_weights
    from npresnet.weights import convert as old_convert, read_weights as old_read_weights

    assert (old_convert, old_read_weights) == (convert, read_weights)
    assert npresnet.convert is convert
