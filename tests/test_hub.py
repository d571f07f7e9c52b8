"""Fetching official weights, for real, from a local HTTP server: verification, truncation, 404, the cache.

The server (127.0.0.1, an ephemeral port, one thread per request) serves files
this test makes; NPRESNET_BASE_URL points npresnet at it and NPRESNET_HOME at
a temporary cache.
"""
import dataclasses
import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import npresnet
from npresnet import hub
from npresnet.cli import main
from npresnet.hub import FetchError, download, fetch, is_weights_name
from npresnet.manifest import entry_for_sha256, get_weights_entry, official_weights, sha256_prefix
from npresnet.specs import ARCHITECTURES, count_params
from helpers import assert_close
from image_files import photos
from npresnet.progress import Progress

TRUNCATED = "truncated"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        item = self.server.files.get(self.path.lstrip("/"))
        if item is None:
            self.send_error(404, "Not Found")
            return
        data, mode = item
        self.send_response(200)
        # A truncated transfer: the header promises more than the body, then the connection closes.
        self.send_header("Content-Length", str(len(data) + (1000 if mode == TRUNCATED else 0)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.requests = {}, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("NPRESNET_BASE_URL", httpd.url)
    monkeypatch.setenv("NPRESNET_HOME", str(tmp_path / "cache"))
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def blob(n=200_000, seed=0):
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    return data, hashlib.sha256(data).hexdigest()


def cache_contents(tmp_path):
    cache = tmp_path / "cache"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# --- download ---------------------------------------------------------------------------


def test_download_good_file(server, tmp_path):
    data, sha = blob()
    server.files[f"blob-{sha[:8]}.pth"] = (data, None)
    dst = tmp_path / "out.pth"
    assert download(f"{server.url}/blob-{sha[:8]}.pth", dst) == sha
    assert dst.read_bytes() == data


def test_download_wrong_hash_names_both_and_leaves_nothing(server, tmp_path):
    data, sha = blob()
    server.files["blob-deadbeef.pth"] = (data, None)
    dst = tmp_path / "out.pth"
    with pytest.raises(FetchError, match=rf"sha256 mismatch: expected deadbeef\.\.\., got {sha}"):
        download(f"{server.url}/blob-deadbeef.pth", dst)
    assert not dst.exists()


def test_download_truncated_transfer_is_refused(server, tmp_path):
    data, sha = blob()
    server.files[f"blob-{sha[:8]}.pth"] = (data, TRUNCATED)
    dst = tmp_path / "out.pth"
    with pytest.raises(FetchError, match=rf"truncated transfer: received {len(data)} of {len(data) + 1000} bytes"):
        download(f"{server.url}/blob-{sha[:8]}.pth", dst)
    assert not dst.exists()


def test_download_404(server, tmp_path):
    dst = tmp_path / "out.pth"
    with pytest.raises(FetchError, match=r"/missing-0123abcd.pth: HTTP 404"):
        download(f"{server.url}/missing-0123abcd.pth", dst)
    assert not dst.exists() and server.requests == ["/missing-0123abcd.pth"]


def test_download_without_hash_prefix_is_never_accepted_unverified(server, tmp_path):
    data, sha = blob()
    server.files["weights.pth"] = (data, None)
    dst = tmp_path / "out.pth"
    with pytest.raises(FetchError, match="cannot verify: the file name carries no sha256 prefix"):
        download(f"{server.url}/weights.pth", dst)
    assert not dst.exists() and server.requests == []
    # With the expected hash given, the same file is verified and accepted; a wrong one is refused.
    assert download(f"{server.url}/weights.pth", dst, sha256=sha) == sha
    with pytest.raises(FetchError, match="sha256 mismatch"):
        download(f"{server.url}/weights.pth", dst, sha256="0" * 64)
    assert not dst.exists()


def test_no_network_says_how_to_use_a_local_file(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NPRESNET_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NPRESNET_HOME", str(tmp_path / "cache"))
    image = str(photos()[0])
    assert main(["classify", "--arch", "resnet18", "--weights", "DEFAULT", "--backend", "numpy", image]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"npresnet: error: could not download http://127.0.0.1:{port}/resnet18-f37072fd.pth (")
    assert "npresnet fetch resnet18 --from-file resnet18-f37072fd.pth" in err
    assert "--weights resnet18-f37072fd.pth" in err and "weights=" not in err and err.count("\n") == 1
    assert cache_contents(tmp_path) == []


def test_progress_bar_only_when_asked_or_on_a_terminal(server, tmp_path, capsys):
    data, sha = blob()
    server.files[f"blob-{sha[:8]}.pth"] = (data, None)
    download(f"{server.url}/blob-{sha[:8]}.pth", tmp_path / "a.pth", progress=True)
    assert "100%" in capsys.readouterr().err
    download(f"{server.url}/blob-{sha[:8]}.pth", tmp_path / "b.pth")  # stderr is not a terminal here
    assert capsys.readouterr().err == ""


# --- fetch: download, verify, convert, cache ----------------------------------------------


def oracle():
    """torch and the oracle network, or a skip where torch is absent (the download tests above need neither)."""
    torch = pytest.importorskip("torch")
    import torch_resnet

    return torch, torch_resnet.torch_resnet, torch_resnet.randomise


@pytest.fixture(scope="module")
def resnet18_checkpoint(tmp_path_factory):
    """(torch resnet18, its .pth bytes, their sha256): what the server hands out as official weights."""
    torch, torch_resnet, randomise = oracle()
    model = randomise(torch_resnet(npresnet.get_spec("resnet18")), 3)
    path = tmp_path_factory.mktemp("official") / "r18.pth"
    torch.save(model.state_dict(), path)
    data = path.read_bytes()
    return model, data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def official(server, resnet18_checkpoint, monkeypatch):
    """The manifest's resnet18 entries, renamed to carry the test checkpoint's real hash prefix."""
    model, data, sha = resnet18_checkpoint
    real = hub.get_weights_entry

    def entry(arch, name="DEFAULT"):
        e = real(arch, name)
        return dataclasses.replace(e, url=f"https://download.pytorch.org/models/{arch}-{sha[:8]}.pth")

    monkeypatch.setattr(hub, "get_weights_entry", entry)
    server.files[f"resnet18-{sha[:8]}.pth"] = (data, None)
    return model, sha


def test_named_weights_are_fetched_converted_cached(official, server, tmp_path):
    tmodel, sha = official
    model = npresnet.resnet18(weights="DEFAULT", backend="numpy")
    assert cache_contents(tmp_path) == [f"resnet18-{sha[:8]}.npz"]  # nothing else: no temporary left behind
    assert server.requests == [f"/resnet18-{sha[:8]}.pth"]
    assert model.meta["crop_size"] == 224 and model.meta["resize_size"] == 256  # resnet18 DEFAULT = IMAGENET1K_V1
    assert model.meta["weights"] == "resnet18.IMAGENET1K_V1" and model.meta["source_sha256"] == sha
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 48)).astype(np.float32)
    torch = oracle()[0]
    with torch.no_grad():
        want = tmodel(torch.from_numpy(x)).numpy()
    assert_close(model(x), want)
    again = npresnet.resnet18(weights="IMAGENET1K_V1", backend="numpy")  # the same file, from the cache
    assert len(server.requests) == 1
    np.testing.assert_array_equal(again(x), model(x))


def test_official_file_loaded_directly_remembers_its_preprocessing(resnet18_checkpoint, tmp_path, monkeypatch):
    """A .pth whose sha256 matches a manifest entry's prefix gets that entry's preprocessing, by any name."""
    from npresnet import manifest

    _, data, sha = resnet18_checkpoint
    real = manifest.official_weights()
    v2 = dataclasses.replace(get_weights_entry("resnet50", "IMAGENET1K_V2"), arch="resnet18",
                             url=f"https://download.pytorch.org/models/resnet18-{sha[:8]}.pth")
    monkeypatch.setattr(manifest, "official_weights", lambda: (*real, v2))
    path = tmp_path / "renamed.pth"
    path.write_bytes(data)
    model = npresnet.load(path)
    assert (model.meta["crop_size"], model.meta["resize_size"], model.meta["weights"]) == (224, 232, "resnet18.IMAGENET1K_V2")
    path.write_bytes(data + b"\0")  # another file (a zip tolerates trailing bytes): no preprocessing claimed
    assert "crop_size" not in npresnet.load(path).meta


def test_fetch_wrong_hash_leaves_cache_empty(server, resnet18_checkpoint, tmp_path):
    _, data, sha = resnet18_checkpoint
    server.files["resnet18-f37072fd.pth"] = (data, None)  # the manifest's name, our (different) bytes
    with pytest.raises(FetchError, match=rf"sha256 mismatch: expected f37072fd\.\.\., got {sha}"):
        npresnet.resnet18(weights="IMAGENET1K_V1")
    assert cache_contents(tmp_path) == []


def test_fetch_truncated_leaves_cache_empty(official, server, tmp_path):
    _, sha = official
    name = f"resnet18-{sha[:8]}.pth"
    server.files[name] = (server.files[name][0], TRUNCATED)
    with pytest.raises(FetchError, match="truncated transfer"):
        fetch("resnet18", "IMAGENET1K_V1")
    assert cache_contents(tmp_path) == []


def test_interrupted_fetch_leaves_cache_empty(official, server, tmp_path, monkeypatch):
    def interrupt(self, received):
        raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fetch("resnet18", progress=True)
    assert cache_contents(tmp_path) == []


def test_fetch_refuses_weights_of_another_architecture(server, monkeypatch, tmp_path):
    torch, torch_resnet, randomise = oracle()
    tiny = randomise(torch_resnet(npresnet.ResNetSpec("custom", "basic", (1, 1, 1, 1), num_classes=3)), 0)
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    real = hub.get_weights_entry
    monkeypatch.setattr(hub, "get_weights_entry", lambda a, n="DEFAULT": dataclasses.replace(real(a, n), url=f"x/{a}-{sha[:8]}.pth"))
    server.files[f"resnet34-{sha[:8]}.pth"] = (data, None)
    with pytest.raises(FetchError, match="holds weights for custom, not resnet34"):
        fetch("resnet34")
    assert cache_contents(tmp_path) == []


def test_cli_fetch(official, server, capsys):
    _, sha = official
    assert main(["fetch", "resnet18", "--weights", "IMAGENET1K_V1"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"resnet18-{sha[:8]}.npz")


def test_cli_fetch_errors_are_one_line(server, capsys):
    for argv, message in [
        (["fetch", "resnet50"], "HTTP 404"),
        (["fetch", "resnet50", "--weights", "IMAGENET1K_V9"], "no weights named 'IMAGENET1K_V9' for resnet50"),
    ]:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("npresnet: error: ") and message in err and err.count("\n") == 1


# --- the manifest -----------------------------------------------------------------------------


def test_manifest_defaults_and_preprocessing():
    assert get_weights_entry("resnet50", "DEFAULT").name == "IMAGENET1K_V2"
    assert get_weights_entry("resnet50", "DEFAULT").resize_size == 232
    assert get_weights_entry("resnet50", "IMAGENET1K_V1").resize_size == 256
    assert get_weights_entry("resnet50").sha256_prefix == "11ad3fa6"
    for arch in ARCHITECTURES:  # every architecture has official weights, exactly one of them the default
        entries = [e for e in official_weights() if e.arch == arch]
        assert sum(e.default for e in entries) == 1, arch
        for e in entries:  # the table's facts agree with the architectures as data
            assert e.num_params == count_params(ARCHITECTURES[arch]), e
            assert e.sha256_prefix and e.file_name == f"{arch}-{e.sha256_prefix}.pth"
    with pytest.raises(ValueError, match="no weights named 'V3' for resnet18; known: DEFAULT, IMAGENET1K_V1"):
        get_weights_entry("resnet18", "V3")
    assert entry_for_sha256("11ad3fa6" + "0" * 56, "resnet50").name == "IMAGENET1K_V2"
    assert entry_for_sha256("11ad3fa6" + "0" * 56, "resnet18") is None


@pytest.mark.parametrize(
    "text, name",
    [("resnet50-11ad3fa6.pth", True), ("weights.pth", False), ("resnet50-11ad3f.pth", False), ("a-0123456789abcdef.bin", True)],
)
def test_sha256_prefix_in_file_names(text, name):
    assert (sha256_prefix(text) is not None) == name


@pytest.mark.parametrize(
    "weights, is_name",
    [("DEFAULT", True), ("IMAGENET1K_V2", True), ("resnet50.npz", False), ("weights/R.PTH", False), ("mine", False)],
)
def test_weights_names_and_paths(weights, is_name):
    assert is_weights_name(weights) == is_name


def test_cli_classify_with_official_weights_name(official, server, capsys):
    """--weights NAME fetches --arch's official file once; the answer is the Python API's on the same weights."""
    from pathlib import Path

    image = str(Path(__file__).parent / "data" / "chelsea_small.png")
    assert main(["classify", "--arch", "resnet18", "--weights", "IMAGENET1K_V1", "--backend", "numpy", "--json", image]) == 0
    import json

    line = json.loads(capsys.readouterr().out.strip())
    model = npresnet.resnet18(weights="IMAGENET1K_V1", backend="numpy")
    want = npresnet.classify([image], model, topk=5)[0]
    assert [p["index"] for p in line["top"]] == [p.index for p in want]
    assert len(server.requests) == 1  # the second build came from the cache


# --- offline: an official file downloaded by hand ------------------------------------------------


def test_fetch_from_file_verifies_and_caches_so_the_name_works_offline(official, server, tmp_path, capsys):
    tmodel, sha = official
    by_hand = tmp_path / f"resnet18-{sha[:8]}.pth"
    by_hand.write_bytes(server.files[by_hand.name][0])
    assert main(["fetch", "resnet18", "--from-file", str(by_hand)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"resnet18-{sha[:8]}.npz")
    model = npresnet.resnet18(weights="DEFAULT", backend="numpy")
    assert server.requests == []  # nothing was downloaded
    assert model.meta["weights"] == "resnet18.IMAGENET1K_V1" and model.meta["resize_size"] == 256
    x = np.random.default_rng(1).standard_normal((1, 3, 40, 40)).astype(np.float32)
    torch = oracle()[0]
    with torch.no_grad():
        assert_close(model(x), tmodel(torch.from_numpy(x)).numpy())


def test_fetch_from_file_refuses_a_file_that_is_not_the_official_one(official, server, tmp_path, capsys):
    _, sha = official
    corrupt = tmp_path / f"resnet18-{sha[:8]}.pth"
    corrupt.write_bytes(server.files[corrupt.name][0][:-1] + b"?")
    assert main(["fetch", "resnet18", "--from-file", str(corrupt)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"npresnet: error: {corrupt}: not one of TorchVision's resnet18 files (resnet18-{sha[:8]}.pth)")
    assert "corrupt or incomplete download" in err and err.count("\n") == 1
    assert main(["fetch", "resnet18", "--weights", "IMAGENET1K_V1", "--from-file", str(corrupt)]) == 1
    assert f"sha256 mismatch: expected {sha[:8]}... (resnet18-{sha[:8]}.pth)" in capsys.readouterr().err
    assert cache_contents(tmp_path) == []


def test_a_file_named_like_an_official_one_must_hash_like_it(resnet18_checkpoint, tmp_path):
    """A corrupt download under its official name must not load without the preprocessing the name promises."""
    _, data, sha = resnet18_checkpoint
    path = tmp_path / "resnet18-f37072fd.pth"  # TorchVision's resnet18 file name, other bytes
    path.write_bytes(data)
    message = rf"resnet18-f37072fd.pth: named like TorchVision's resnet18 IMAGENET1K_V1 file, but its sha256 is {sha}"
    with pytest.raises(npresnet.WeightsError, match=message):
        npresnet.load(path)
    with pytest.raises(npresnet.WeightsError, match=message):
        npresnet.convert(path, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


def test_official_weights_as_values(official, server):
    """npresnet.ResNet18_Weights.IMAGENET1K_V1 as TorchVision's enum: a builder argument with .transforms()."""
    weights = npresnet.ResNet18_Weights.DEFAULT
    assert weights == npresnet.ResNet18_Weights.IMAGENET1K_V1 and str(weights) == "resnet18.IMAGENET1K_V1"
    assert weights.transforms() == npresnet.ImageClassification(crop_size=224, resize_size=256)
    assert npresnet.ResNet50_Weights.IMAGENET1K_V2.transforms().resize_size == 232  # TorchVision's V2 preset
    assert [w.name for w in npresnet.ResNet50_Weights] == ["IMAGENET1K_V1", "IMAGENET1K_V2"]
    with pytest.raises(AttributeError, match="ResNet50_Weights has no IMAGENET1K_V3"):
        npresnet.ResNet50_Weights.IMAGENET1K_V3
    model = npresnet.resnet18(weights=weights, backend="numpy")
    assert model.meta["weights"] == "resnet18.IMAGENET1K_V1"
    with pytest.raises(npresnet.WeightsError, match="resnet18.IMAGENET1K_V1 are weights for resnet18, not resnet34"):
        npresnet.resnet34(weights=weights)
