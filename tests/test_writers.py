"""Back to PyTorch: the .pth and .safetensors files npresnet writes without torch, read by torch and by npresnet.

torch.load(weights_only=True) and safetensors.torch.load_file must hand TorchVision's
model (tests/torch_resnet.py) a state dict that load_state_dict(strict=True) accepts,
num_batches_tracked included, and the loaded model must give npresnet's outputs.
"""
import collections
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import npresnet  # noqa: E402
from helpers import assert_close  # noqa: E402
from npresnet import writers  # noqa: E402
from npresnet.checkpoint import read_safetensors, read_torch_checkpoint  # noqa: E402
from npresnet.cli import main  # noqa: E402
from npresnet.specs import BOTTLENECK, ResNetSpec, get_spec  # noqa: E402
from npresnet.weights import WeightsError, read_weights, save_npz  # noqa: E402
from torch_resnet import numpy_state_dict, randomise, torch_resnet  # noqa: E402

R18_10 = get_spec("resnet18").replace(num_classes=10)
BOTTLENECK_10 = ResNetSpec("custom", BOTTLENECK, (1, 1, 1, 1), groups=32, width_per_group=4, num_classes=10)


def torch_oracle(spec, seed):
    """A randomised torch model whose batch norms have each counted a different number of batches."""
    model = randomise(torch_resnet(spec), seed)
    for i, module in enumerate(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        module.num_batches_tracked.fill_(1000 + i)
    return model


def load_with_torch(path):
    if str(path).endswith(".safetensors"):
        return safetensors_torch.load_file(str(path))
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    "spec, suffix, dtype",
    [
        (R18_10, ".pth", np.float32),
        (R18_10, ".safetensors", np.float64),
        (BOTTLENECK_10, ".pth", np.float64),
        (BOTTLENECK_10, ".safetensors", np.float32),
    ],
    ids=["resnet18-pth-f32", "resnet18-safetensors-f64", "bottleneck-pth-f64", "bottleneck-safetensors-f32"],
)
def test_torch_loads_converted_npz_strictly_with_npresnets_outputs(tmp_path, spec, suffix, dtype):
    oracle = torch_oracle(spec, seed=3)
    state = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in numpy_state_dict(oracle).items()}
    src, dst = tmp_path / "trained.npz", tmp_path / f"trained{suffix}"
    save_npz(src, state, {"arch": spec.name, "crop_size": 64})  # num_batches_tracked included, as a trainer keeps them
    meta = npresnet.convert(src, dst)
    assert meta["num_classes"] == 10

    loaded = load_with_torch(dst)
    assert set(loaded) == set(state)
    for key, value in loaded.items():
        want = torch.from_numpy(state[key])
        assert value.dtype == want.dtype and value.shape == want.shape, key
        assert torch.equal(value, want), key
    assert loaded["layer1.0.bn1.num_batches_tracked"].item() >= 1000

    model = torch_resnet(spec).to(torch.float64 if dtype == np.float64 else torch.float32)
    model.load_state_dict(loaded, strict=True)
    model.eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(dtype)
    ours = npresnet.load(src, backend="numpy")
    with torch.no_grad():
        assert_close(model(torch.from_numpy(x)).numpy(), ours(x))

    # npresnet reads its own file back: the same parameters, so the same outputs.
    again = npresnet.load(dst, backend="numpy").state_dict()
    for key, value in ours.state_dict().items():
        np.testing.assert_array_equal(again[key], value)


def test_missing_counters_are_written_as_zero(tmp_path):
    oracle = torch_oracle(R18_10, seed=1)
    src = tmp_path / "plain.npz"
    no_counters = {k: v for k, v in numpy_state_dict(oracle).items() if not k.endswith("num_batches_tracked")}
    save_npz(src, no_counters)  # a state dict without counters (npresnet.save writes the model's)
    assert not any(k.endswith("num_batches_tracked") for k in read_weights(src)[0])
    for suffix in (".pth", ".safetensors"):
        npresnet.convert(src, tmp_path / f"out{suffix}")
        loaded = load_with_torch(tmp_path / f"out{suffix}")
        counters = {k: v for k, v in loaded.items() if k.endswith("num_batches_tracked")}
        assert len(counters) == 20  # resnet18: bn1, 16 in the blocks, 3 downsamples
        assert all(v.dtype == torch.int64 and v.shape == () and v.item() == 0 for v in counters.values())
        torch_resnet(R18_10).load_state_dict(loaded, strict=True)


def test_pth_to_pth_keeps_counters_and_metadata_goes_to_safetensors(tmp_path):
    oracle = torch_oracle(BOTTLENECK_10, seed=2)
    src = tmp_path / "theirs.pth"
    torch.save(oracle.state_dict(), src)
    npresnet.convert(src, tmp_path / "mine.pth")
    loaded = torch.load(tmp_path / "mine.pth", weights_only=True)
    assert list(loaded) == list(oracle.state_dict())  # TorchVision's key order
    for key, value in oracle.state_dict().items():
        assert torch.equal(loaded[key], value), key

    npresnet.convert(src, tmp_path / "mine.safetensors", meta={"crop_size": 176})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "mine.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["arch"] == "custom" and metadata["num_classes"] == "10" and metadata["crop_size"] == "176"
    assert metadata["source"] == "theirs.pth"
    assert read_safetensors(tmp_path / "mine.safetensors")[1] == metadata


def test_dtypes_shapes_and_layout(tmp_path):
    """float16/32/64, int64, scalars, empty, non-contiguous and big-endian arrays; members aligned as torch aligns them."""
    rng = np.random.default_rng(0)
    state = collections.OrderedDict(
        half=rng.standard_normal((3, 5)).astype(np.float16),
        single=rng.standard_normal((2, 3, 4)).astype(np.float32),
        double=rng.standard_normal((4, 3)).T,  # non-contiguous
        big_endian=rng.standard_normal(7).astype(">f4"),
        counter=np.array(12345678901, dtype=np.int64),  # a scalar past 2**31
        negative=np.array([-5, 3], dtype=np.int64),
        empty=np.zeros((0, 4), dtype=np.float32),
    )
    pth, st = tmp_path / "t.pth", tmp_path / "t.safetensors"
    writers.save_pth(pth, state)
    writers.save_safetensors(st, state, {"note": "hi", "n": 3})
    for loaded in (torch.load(pth, weights_only=True), torch.load(pth, weights_only=True, mmap=True),
                   safetensors_torch.load_file(str(st))):
        assert set(loaded) == set(state)
        for key, value in state.items():
            want = torch.from_numpy(value.astype(value.dtype.newbyteorder("=")))
            assert loaded[key].dtype == want.dtype and loaded[key].shape == want.shape, key
            assert torch.equal(loaded[key], want), key
    # npresnet's own readers
    for got in (read_torch_checkpoint(pth), read_safetensors(st)[0]):
        for key, value in state.items():
            assert got[key].shape == value.shape
            np.testing.assert_array_equal(got[key], value)
    assert read_safetensors(st)[1] == {"note": "hi", "n": "3"}

    raw = pth.read_bytes()
    with zipfile.ZipFile(pth) as archive:
        infos = archive.infolist()
        assert archive.read("archive/byteorder") == b"little" and archive.read("archive/version") == b"3\n"
    for info in infos:
        assert info.compress_type == zipfile.ZIP_STORED
        name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
        assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0, info.filename
    header_length = struct.unpack("<Q", st.read_bytes()[:8])[0]
    assert header_length % 8 == 0


def test_unwritable_dtype_and_key(tmp_path):
    with pytest.raises(WeightsError, match="complex128"):
        writers.save_pth(tmp_path / "x.pth", {"a": np.zeros(2, dtype=np.complex128)})
    with pytest.raises(WeightsError, match="__metadata__"):
        writers.save_safetensors(tmp_path / "x.safetensors", {"__metadata__": np.zeros(2)})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny.npz"
    npresnet.save(npresnet.ResNet.from_state_dict(numpy_state_dict(torch_oracle(BOTTLENECK_10, 5)), backend="numpy"), path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors", ".npz"])
def test_cli_convert_to_each_suffix(tmp_path, capsys, tiny_npz, suffix):
    dst = tmp_path / f"out{suffix}"
    assert main(["convert", str(tiny_npz), str(dst)]) == 0
    assert f"{dst}: custom, num_classes 10" in capsys.readouterr().out
    want = npresnet.load(tiny_npz).state_dict()
    if suffix != ".npz":
        model = torch_resnet(BOTTLENECK_10)
        model.load_state_dict(load_with_torch(dst), strict=True)
        for key, value in model.state_dict().items():
            if not key.endswith("num_batches_tracked"):
                np.testing.assert_array_equal(value.numpy(), want[key])
    got = npresnet.load(dst).state_dict()
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_written_where_torch_cannot_be_imported(tmp_path, tiny_npz):
    script = textwrap.dedent(
        """
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, BlockTorch())
        import npresnet

        for dst in sys.argv[2:]:
            npresnet.convert(sys.argv[1], dst)
        assert not any(m.split(".")[0] == "torch" for m in sys.modules)
        """
    )
    outputs = [tmp_path / "out.pth", tmp_path / "out.safetensors"]
    done = subprocess.run([sys.executable, "-c", script, str(tiny_npz), *map(str, outputs)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for path in outputs:
        torch_resnet(BOTTLENECK_10).load_state_dict(load_with_torch(path), strict=True)


@pytest.mark.parametrize("name", ["out.onnx", "out"])
def test_bad_suffix_is_one_clear_line(tmp_path, capsys, tiny_npz, name):
    assert main(["convert", str(tiny_npz), str(tmp_path / name)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("npresnet: error: ")
    assert ("'.onnx'" if name == "out.onnx" else "without a suffix") in err and ".safetensors" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_nothing_half_written(tmp_path, tiny_npz, monkeypatch, suffix):
    dst = tmp_path / f"out{suffix}"
    dst.write_bytes(b"previous")
    members = []

    def fail_at_fifth_member(*args, real=writers._write_aligned):
        members.append(args[2])
        if len(members) == 5:
            raise OSError("disk full")
        return real(*args)

    def fail_fsync(fd):
        raise OSError("disk full")

    if suffix == ".pth":
        monkeypatch.setattr(writers, "_write_aligned", fail_at_fifth_member)  # four members already in the archive
    else:
        monkeypatch.setattr("os.fsync", fail_fsync)  # every byte already written
    with pytest.raises(OSError, match="disk full"):
        npresnet.convert(tiny_npz, dst)
    assert dst.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == [dst.name]  # no temporary file left behind
