"""PyTorch checkpoints and .safetensors read without torch: every layout and dtype, against torch's outputs.

torch saves the checkpoints here; npresnet converts them in a subprocess where
importing torch fails, and the converted models must give the torch model's
outputs. Malicious, truncated, lying and foreign files must be refused.
"""
import collections
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import npresnet  # noqa: E402
from helpers import assert_close  # noqa: E402
from npresnet.checkpoint import read_safetensors, read_torch_checkpoint  # noqa: E402
from npresnet.cli import main  # noqa: E402
from npresnet.specs import BASIC, BOTTLENECK, ResNetSpec, get_spec  # noqa: E402
from npresnet.weights import WeightsError, extract_state_dict  # noqa: E402
from torch_resnet import randomise, torch_resnet  # noqa: E402

NO_TORCH = textwrap.dedent(
    """
    import json, sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")

    sys.meta_path.insert(0, BlockTorch())
    try:
        import torch
    except ImportError:
        pass
    else:
        raise SystemExit("the torch blocker did not work")
    """
)


def run_without_torch(script: str, payload) -> object:
    """Run `script` (after NO_TORCH) in a fresh interpreter, payload as JSON on stdin; its JSON stdout."""
    code = NO_TORCH + textwrap.dedent(script) + "\nassert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules)\n"
    done = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(payload), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


CONVERT_ALL = """
import npresnet
results = {}
for src, dst in json.load(sys.stdin):
    try:
        results[src] = {"meta": npresnet.convert(src, dst)}
    except npresnet.WeightsError as exc:
        results[src] = {"error": str(exc)}
print(json.dumps(results))
"""


# --- the torch side: models and the layouts people save them in -------------------------


# Small members of the family keep this file fast: the reader, not the network, is under test here
# (tests/test_model.py compares every TorchVision architecture with torch).
R18 = get_spec("resnet18")
TINY = ResNetSpec("custom", BASIC, (1, 1, 1, 1), num_classes=10)  # a replaced head, too
TINY_X = ResNetSpec("custom", BOTTLENECK, (1, 1, 1, 1), groups=32, width_per_group=4, num_classes=10)


def oracle_model(spec=TINY, seed=0):
    return randomise(torch_resnet(spec), seed)


def strided_shared(state):
    """Every floating tensor as a non-contiguous view (reversed dims, every other element) at an offset
    into ONE shared storage; integer tensors (num_batches_tracked) untouched."""
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    big = torch.full((sum(2 * v.numel() + 3 for v in floats.values()),), float("nan"), dtype=torch.float32)
    out, offset = {}, 0
    for k, v in state.items():
        if k not in floats:
            out[k] = v
            continue
        rev = tuple(reversed(v.shape))
        strides, step = [], 2
        for n in reversed(rev):
            strides.append(step)
            step *= n
        view = torch.as_strided(big, rev, tuple(reversed(strides)), offset + 3).permute(*reversed(range(v.dim())))
        view.copy_(v)
        assert not view.is_contiguous() or v.dim() == 0
        out[k] = view
        offset += 2 * v.numel() + 3
    return collections.OrderedDict(out)


def write_safetensors(path, state):
    """An independent .safetensors writer, from the format's spec (not npresnet's code)."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for k, v in state.items():
        data = v.contiguous().view(torch.uint8).numpy().tobytes() if v.dim() else v.reshape(1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def as_dtype(state, dtype):
    return collections.OrderedDict((k, v.to(dtype) if v.is_floating_point() else v) for k, v in state.items())


def prefixed(state, prefix):
    return collections.OrderedDict((prefix + k, v) for k, v in state.items())


# Each case: (spec, torch dtype of the weights, format: "zip", "legacy" or "safetensors", how the file is laid out).
CASES = {
    "resnet18_bare_zip": (R18, torch.float32, "zip", lambda sd: sd),
    "resnet18_bare_legacy": (R18, torch.float32, "legacy", lambda sd: sd),
    "nested_state_dict_with_optimizer": (
        TINY, torch.float32, "zip",
        lambda sd: {"epoch": 7, "state_dict": sd, "optimizer": {"lr": 0.1, "momentum": [0.9]}, "arch": "resnet18"},
    ),
    "nested_model_module_prefix_legacy": (TINY, torch.float32, "legacy", lambda sd: {"model": prefixed(sd, "module."), "epoch": 3}),
    "backbone_prefix": (TINY, torch.float32, "zip", lambda sd: prefixed(sd, "backbone.")),
    "lightning_model_prefix": (TINY, torch.float32, "zip", lambda sd: {"state_dict": prefixed(sd, "model.")}),
    "num_batches_tracked_shape_1": (
        TINY, torch.float32, "zip",
        lambda sd: collections.OrderedDict((k, v.reshape(1) if k.endswith("num_batches_tracked") else v) for k, v in sd.items()),
    ),
    "num_batches_tracked_absent": (
        TINY, torch.float32, "legacy",
        lambda sd: collections.OrderedDict((k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")),
    ),
    "keep_vars_parameters": (TINY, torch.float32, "zip", "keep_vars"),
    "float16_zip": (TINY, torch.float16, "zip", lambda sd: sd),
    "bfloat16_zip": (TINY, torch.bfloat16, "zip", lambda sd: sd),
    "bfloat16_legacy": (TINY, torch.bfloat16, "legacy", lambda sd: sd),
    "float64_zip": (TINY, torch.float64, "zip", lambda sd: sd),
    "float64_legacy": (TINY, torch.float64, "legacy", lambda sd: sd),
    "strided_shared_storage_zip": (TINY, torch.float32, "zip", strided_shared),
    "strided_shared_storage_legacy": (TINY, torch.float32, "legacy", strided_shared),
    "safetensors_bf16": (TINY, torch.bfloat16, "safetensors", lambda sd: sd),
    "safetensors_module_prefix": (TINY, torch.float32, "safetensors", lambda sd: prefixed(sd, "module.")),
    "bottleneck_groups_legacy_nested": (TINY_X, torch.float32, "legacy", lambda sd: {"state_dict": sd}),
    "bottleneck_groups_float16_zip": (TINY_X, torch.float16, "zip", lambda sd: sd),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every case saved by torch and converted by npresnet without torch: case -> (torch model, result, .npz)."""
    root = tmp_path_factory.mktemp("checkpoints")
    models, pairs = {}, []
    for case, (spec, dtype, fmt, layout) in CASES.items():
        if (spec, dtype) not in models:
            # The oracle holds what the file holds: weights rounded to `dtype`, kept in float64.
            models[spec, dtype] = oracle_model(spec).to(dtype).double()
        model = models[spec, dtype]
        src = root / (case + (".safetensors" if fmt == "safetensors" else ".pth"))
        if layout == "keep_vars":  # nn.Parameter objects, pickled by torch._utils._rebuild_parameter
            torch.save(model.to(dtype).state_dict(keep_vars=True), src)
            model.double()
        elif fmt == "safetensors":
            write_safetensors(src, layout(as_dtype(model.state_dict(), dtype)))
        else:
            torch.save(layout(as_dtype(model.state_dict(), dtype)), src, _use_new_zipfile_serialization=fmt == "zip")
        pairs.append((str(src), str(root / (case + ".npz"))))
    results = run_without_torch(CONVERT_ALL, pairs)
    return {case: (models[CASES[case][:2]], results[src], dst) for case, (src, dst) in zip(CASES, pairs)}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_checkpoint_matches_torch(converted, case):
    spec, dtype, _, _ = CASES[case]
    tmodel, result, dst = converted[case]
    assert "error" not in result, result.get("error")
    meta = result["meta"]
    assert (meta["arch"], meta["num_classes"], meta["stem"]) == (spec.name, spec.num_classes, "imagenet")
    assert len(meta["source_sha256"]) == 64 and "crop_size" not in meta  # not an official file
    float_dtype = np.float64 if dtype == torch.float64 else np.float32
    model = npresnet.load(dst, backend="numpy")
    assert model.spec == spec
    assert model.state_dict()["conv1.weight"].dtype == float_dtype
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(float_dtype)
    with torch.no_grad():
        want = tmodel.to(torch.float64 if float_dtype == np.float64 else torch.float32)(torch.from_numpy(x)).numpy()
    tmodel.double()
    assert_close(model(x), want)


def test_direct_pth_and_safetensors_loads_without_torch(converted):
    """Constructors and npresnet.load read .pth/.safetensors paths themselves, in a process without torch."""
    sources = [str(converted[c][2]).replace(".npz", ext) for c, ext in
               [("nested_model_module_prefix_legacy", ".pth"), ("safetensors_module_prefix", ".safetensors")]]
    x = np.random.default_rng(2).standard_normal((1, 3, 33, 35)).astype(np.float32)
    got = run_without_torch(
        """
        import numpy as np, npresnet
        srcs, x = json.load(sys.stdin)
        x = np.array(x, dtype=np.float32)
        out = [npresnet.build(npresnet.load(srcs[0]).spec, weights=srcs[0])(x).tolist(), npresnet.load(srcs[1])(x).tolist()]
        print(json.dumps(out))
        """,
        [sources, x.tolist()],
    )
    tmodel = converted["nested_model_module_prefix_legacy"][0].float()
    with torch.no_grad():
        want = tmodel(torch.from_numpy(x)).numpy()
    tmodel.double()
    for logits in got:
        assert_close(np.array(logits, dtype=np.float32), want)


def test_reader_values_are_exact(tmp_path):
    """Every dtype, view and shared storage read back bit for bit (bfloat16 widened exactly)."""
    base = torch.randn(60, dtype=torch.float64)
    a = torch.randn(3, 4)
    state = collections.OrderedDict(
        transposed=a.t(), row=a[1], column=a[:, 2], offset_strided=base[5:45].view(4, 10)[1:, ::3],
        f16=torch.randn(2, 3, dtype=torch.float16), bf16=torch.randn(5, dtype=torch.bfloat16),
        i64=torch.tensor([-3, 2**40]), scalar=torch.tensor(7), empty=torch.zeros(0, 4), same_as_row=a[1],
    )
    for legacy in (False, True):
        path = tmp_path / f"exact_{legacy}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        got = read_torch_checkpoint(path)
        assert list(got) == list(state)
        for k, v in state.items():
            want = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
            assert got[k].shape == want.shape and got[k].dtype == want.dtype, k
            np.testing.assert_array_equal(got[k], want, err_msg=k)
        assert got["row"] is got["same_as_row"]  # one view of one storage: read once, not copied per alias


# --- refusals ----------------------------------------------------------------------------


class Payload:
    """Pickles as a call to `func(*args)`: what a malicious checkpoint hides."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker):
    import builtins
    return {
        "os.system": (Payload(os.system, f"touch {marker}"), "system"),
        "builtins.eval": (Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"), "eval"),
        "subprocess": (Payload(subprocess.call, ["touch", str(marker)]), "call"),
        "builtins.exec": (Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"), "exec"),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess", "builtins.exec"])
@pytest.mark.parametrize("how", ["zip", "legacy", "raw_pickle"])
def test_malicious_checkpoint_is_refused_before_running(tmp_path, name, how):
    marker = tmp_path / "pwned"
    payload, global_name = payloads(marker)[name]
    path = tmp_path / "evil.pth"
    contents = {"conv1.weight": torch.zeros(1), "fc.weight": payload}
    if how == "raw_pickle":  # no tensors: pickle's own tensor reduction is itself refused (torch.storage._load_from_bytes)
        path.write_bytes(pickle.dumps({"fc.weight": payload}, protocol=2))
    else:
        torch.save(contents, path, _use_new_zipfile_serialization=how == "zip")
    out = tmp_path / "out.npz"
    with pytest.raises(WeightsError, match=rf"evil.pth: refused to unpickle global \S*{global_name}"):
        npresnet.convert(path, out)
    with pytest.raises(WeightsError, match="refused to unpickle"):
        npresnet.resnet18(weights=path)
    assert not marker.exists() and not out.exists()
    # The control: the full pickle machinery does run the payload, so the refusal above is what saved us.
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()


def test_pickled_module_is_refused_naming_the_class(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(WeightsError, match=r"refused to unpickle global torch\.nn\.modules\.linear\.Linear.*state_dict"):
        read_torch_checkpoint(path)


STORAGE_DATA = np.arange(10, dtype=np.float32)


class Storage:
    def __init__(self, key):
        self.key = key


class Tensor:
    """Pickles exactly as torch pickles a tensor, with whatever metadata the test wants."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class CheckpointPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", 10)
        return None


def write_zip_checkpoint(path, contents, storages={"0": STORAGE_DATA.tobytes()}):
    """A zip checkpoint laid out as torch writes one, with hand-made tensor metadata."""
    import io
    buf = io.BytesIO()
    CheckpointPickler(buf, protocol=2).dump(contents)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)


def test_handmade_zip_checkpoint_reads(tmp_path):
    """The control for the lying-metadata cases: the same writer with honest metadata reads back."""
    path = tmp_path / "honest.pth"
    write_zip_checkpoint(path, {"w": Tensor(Storage("0"), 1, (3, 3), (3, 1)), "v": Tensor(Storage("0"), 9, (1,), (1,))})
    got = read_torch_checkpoint(path)
    np.testing.assert_array_equal(got["w"], STORAGE_DATA[1:10].reshape(3, 3))
    np.testing.assert_array_equal(got["v"], [9.0])


@pytest.mark.parametrize(
    "offset, size, stride, message",
    [
        (0, (4, 4), (4, 1), r"reaches element 15, but its storage holds only 10"),
        (20, (1,), (1,), r"reaches element 20, but its storage holds only 10"),
        (0, (2, 3), (100, 1), r"reaches element 102"),
        (8, (3,), (1,), r"reaches element 10,"),
        (0, (3,), (-1,), r"negative offset, size or stride"),
        (-1, (3,), (1,), r"negative offset, size or stride"),
        (0, (2, 2), (1,), r"different lengths"),
        (0, (2.5,), (1,), r"malformed tensor metadata"),
    ],
)
def test_lying_tensor_metadata_is_refused(tmp_path, offset, size, stride, message):
    path = tmp_path / "lying.pth"
    write_zip_checkpoint(path, {"conv1.weight": Tensor(Storage("0"), offset, size, stride)})
    with pytest.raises(WeightsError, match=rf"lying.pth.*storage '0'.*{message}"):
        read_torch_checkpoint(path)


def test_missing_and_short_storage_is_refused(tmp_path):
    path = tmp_path / "missing.pth"
    write_zip_checkpoint(path, {"w": Tensor(Storage("7"), 0, (2,), (1,))})
    with pytest.raises(WeightsError, match="missing.pth: storage archive/data/7 is missing"):
        read_torch_checkpoint(path)
    path = tmp_path / "short.pth"
    write_zip_checkpoint(path, {"w": Tensor(Storage("0"), 0, (10,), (1,))}, {"0": STORAGE_DATA.tobytes()[:30]})
    with pytest.raises(WeightsError, match="short.pth.*holds only 7 float32 elements"):
        read_torch_checkpoint(path)


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    state = collections.OrderedDict(
        (k, v) for k, v in oracle_model(TINY).state_dict().items() if k.startswith(("conv1", "bn1", "fc"))
    )
    paths = {}
    for legacy in (False, True):
        paths[legacy] = root / f"small_{legacy}.pth"
        torch.save(state, paths[legacy], _use_new_zipfile_serialization=not legacy)
    return paths


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.97])
def test_truncated_checkpoint_is_refused(tmp_path, small_checkpoints, legacy, keep):
    data = small_checkpoints[legacy].read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * keep)])
    assert read_torch_checkpoint(small_checkpoints[legacy])["conv1.weight"].shape == (64, 3, 7, 7)
    with pytest.raises(WeightsError, match=r"cut.pth: .*(truncated|corrupt|not a readable zip)"):
        read_torch_checkpoint(path)


@pytest.mark.parametrize(
    "contents, message",
    [
        (b"hello, I am a text file\n", r"not a PyTorch checkpoint \(neither a zip archive nor a pickle\)"),
        (pickle.dumps([1, 2, 3], protocol=2), r"not a PyTorch checkpoint \(neither a zip archive nor the legacy format\)"),
        (b"", r"not a PyTorch checkpoint"),
    ],
    ids=["text", "plain_pickle", "empty"],
)
def test_non_checkpoint_files_are_refused(tmp_path, contents, message):
    path = tmp_path / "notes.pth"
    path.write_bytes(contents)
    with pytest.raises(WeightsError, match=rf"notes.pth: {message}"):
        npresnet.convert(path, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


def test_zip_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "weights.pth"
    np.savez(path.with_suffix(".npz"), a=np.zeros(2))
    path.write_bytes(path.with_suffix(".npz").read_bytes())
    with pytest.raises(WeightsError, match=r"weights.pth: a zip archive but not a PyTorch checkpoint"):
        read_torch_checkpoint(path)


@pytest.mark.parametrize(
    "contents, message",
    [
        ({"epoch": 3, "lr": 0.1}, r"no state dict found: a dict with entries \{'epoch' \(int\), 'lr' \(float\)\}"),
        ([torch.zeros(2)], r"no state dict found: the file holds a list"),
        ("state_dict+model", r"ambiguous: state dicts under both 'state_dict' and 'model'"),
        (
            "partial_prefix",
            r"not a ResNet state dict: no key conv1.weight among \d+ tensors \(backbone.conv1.weight.*"
            r"a prefix is stripped only when every key carries it",
        ),
        ({"encoder.weight": torch.zeros(2)}, r"not a ResNet state dict: no key conv1.weight among 1 tensors \(encoder.weight"),
    ],
    ids=["no_tensors", "list", "ambiguous", "partial_prefix", "not_resnet"],
)
def test_unrecognised_layouts_say_what_was_found(tmp_path, contents, message):
    sd = oracle_model(TINY).state_dict()
    if contents == "state_dict+model":
        contents = {"state_dict": sd, "model": sd}
    elif contents == "partial_prefix":
        contents = {("head." + k if k.startswith("fc") else "backbone." + k): v for k, v in sd.items()}
    path = tmp_path / "layout.pth"
    torch.save(contents, path)
    with pytest.raises(WeightsError, match=rf"layout.pth: {message}"):
        npresnet.load(path)


def test_prefix_is_stripped_only_as_a_whole_prefix():
    sd = {"module.conv1.weight": np.zeros(1), "module.fc.weight": np.zeros(1)}
    assert set(extract_state_dict(sd)) == {"conv1.weight", "fc.weight"}
    # "model." inside a key, or on some keys only, is never removed.
    mixed = {"conv1.weight": np.zeros(1), "model.fc.weight": np.zeros(1)}
    assert set(extract_state_dict(mixed)) == set(mixed)


def safetensors_file(tmp_path, header, data=b"\0" * 16, header_length=None):
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if header_length is None else header_length) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, header_length, message",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, 10**9, r"header length 1000000000 exceeds the file"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 16, None, r"data_offsets \[8, 24\] lie outside the 16 data bytes"),
        ({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, b"\0" * 16, None, r"shape \(5,\) of float32 needs 20 bytes"),
        ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, None, r"malformed shape"),
        ({"a": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16, None, r"unsupported dtype 'C64'"),
        ([1, 2], b"", None, r"header is not a JSON object"),
    ],
    ids=["header_too_long", "offsets_outside", "size_mismatch", "negative_shape", "dtype", "not_object"],
)
def test_lying_safetensors_are_refused(tmp_path, header, data, header_length, message):
    path = safetensors_file(tmp_path, header, data, header_length)
    with pytest.raises(WeightsError, match=rf"bad.safetensors: .*{message}"):
        read_safetensors(path)


def test_safetensors_reads_exactly(tmp_path):
    state = {"a": torch.randn(3, 2), "b": torch.randn(4, dtype=torch.bfloat16), "c": torch.tensor([5, -6])}
    write_safetensors(tmp_path / "ok.safetensors", state)
    got, metadata = read_safetensors(tmp_path / "ok.safetensors")
    assert metadata == {"format": "pt"}
    for k, v in state.items():
        np.testing.assert_array_equal(got[k], (v.float() if v.dtype == torch.bfloat16 else v).numpy())


# --- the command line ---------------------------------------------------------------------


def test_cli_convert(tmp_path, capsys):
    sd = oracle_model(TINY).state_dict()
    src, dst = tmp_path / "mine.pth", tmp_path / "mine.npz"
    torch.save({"state_dict": prefixed(sd, "module.")}, src)
    assert main(["convert", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "custom, num_classes 10" in out
    model = npresnet.load(dst)
    np.testing.assert_array_equal(model.state_dict()["fc.bias"], sd["fc.bias"].numpy())
    assert model.meta["source"] == "mine.pth"


def test_cli_convert_errors_are_one_line(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(Payload(os.system, "true"), protocol=2))
    dst = tmp_path / "out.npz"
    dst.write_bytes(b"previous")
    for argv in (["convert", str(evil), str(dst)], ["convert", str(tmp_path / "absent.pth"), str(dst)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("npresnet: error: ") and "Traceback" not in err
    assert dst.read_bytes() == b"previous"


@pytest.mark.parametrize("state", [b"}X\x05\x00\x00\x00dtypeX\x06\x00\x00\x00objects", b"N}X\x05\x00\x00\x00dtypeX\x06\x00\x00\x00objects\x86",
                                   b"N}X\x0c\x00\x00\x00__defaults__)s\x86"],
                         ids=["dict_state", "slot_state", "defaults"])
@pytest.mark.parametrize("allowed", [("torch", "FloatStorage"), ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict")])
def test_build_cannot_alter_the_allowlist(tmp_path, state, allowed):
    """BUILD on an allowed global must fail and not rewrite what later files get."""
    from npresnet.checkpoint import ALLOWED_GLOBALS

    before = repr(ALLOWED_GLOBALS[allowed]), getattr(ALLOWED_GLOBALS[allowed], "__dict__", None)
    path = tmp_path / "build.pth"
    path.write_bytes(b"\x80\x02c" + "\n".join(allowed).encode() + b"\n" + state + b"b.")
    with pytest.raises(WeightsError, match="build.pth: corrupt checkpoint pickle"):
        read_torch_checkpoint(path)
    assert (repr(ALLOWED_GLOBALS[allowed]), getattr(ALLOWED_GLOBALS[allowed], "__dict__", None)) == before


def test_zip_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (20 << 20))
    monkeypatch.setenv("NPRESNET_MAX_LOAD_BYTES", str(1 << 20))  # the default cap (4 x 20 KB + 64 MiB) would read it
    with pytest.raises(WeightsError, match=r"bomb.pth: member archive/data.pkl claims 20971520 bytes, more than"):
        read_torch_checkpoint(path)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_is_refused_by_name(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(WeightsError, match=r"scripted.pt: a TorchScript archive \(torch.jit.save\), not a state dict"):
        npresnet.load(path)


def test_allocation_cap_and_its_override(tmp_path, monkeypatch):
    """A legitimate file over the cap is refused naming the cap and how to raise it; the override reads it."""
    path = tmp_path / "small.pth"
    torch.save({"conv1.weight": torch.ones(64, 64)}, path)  # 16 KiB of tensor data
    assert read_torch_checkpoint(path)["conv1.weight"].shape == (64, 64)
    with pytest.raises(WeightsError, match=r"small.pth: .* past its cap of 20000 bytes.*NPRESNET_MAX_LOAD_BYTES"):
        read_torch_checkpoint(path, max_bytes=20_000)
    monkeypatch.setenv("NPRESNET_MAX_LOAD_BYTES", "20000")
    with pytest.raises(WeightsError, match="past its cap of 20000 bytes"):
        read_torch_checkpoint(path)
    monkeypatch.setenv("NPRESNET_MAX_LOAD_BYTES", str(1 << 30))
    assert read_torch_checkpoint(path)["conv1.weight"].sum() == 64 * 64


def test_weights_file_type_read_from_its_content(tmp_path):
    """A checkpoint under a suffix that says nothing is recognised by its first bytes; a text file is refused."""
    from npresnet.formats import read_weights

    sd = oracle_model(TINY).state_dict()
    for legacy in (False, True):
        path = tmp_path / f"model_{legacy}.weights"
        torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
        state, meta = read_weights(path)
        np.testing.assert_array_equal(state["fc.bias"], sd["fc.bias"].numpy())
    (tmp_path / "notes.weights").write_text("hello")
    with pytest.raises(WeightsError, match="notes.weights: not a valid weights file"):
        read_weights(tmp_path / "notes.weights")
