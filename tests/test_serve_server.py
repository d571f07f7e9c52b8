"""A real `npresnet serve` process on 127.0.0.1: concurrent uploads, a burst past the queue limit, its memory after."""
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec

import numpy as np
import pytest

import npresnet
from image_files import photos
from serve_client import get, post, running_server

WEB = find_spec("flask") is not None and find_spec("waitress") is not None
pytestmark = pytest.mark.skipif(not WEB, reason="npresnet serve needs the web extra: pip install 'npresnet[web]'")
BACKENDS = [
    "numpy",
    pytest.param("numba", marks=pytest.mark.skipif(find_spec("numba") is None, reason="numba is not installed")),
]
CONCURRENT = 50
BURST = 60


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """resnet18 with random parameters at TorchVision's preset (224), and the same at a small size (64)."""
    folder = tmp_path_factory.mktemp("weights")
    model = npresnet.build("resnet18", backend="numpy")
    npresnet.save(model, folder / "resnet18.npz")
    model.meta.update(crop_size=64, resize_size=72)
    npresnet.save(model, folder / "resnet18_64.npz")
    return folder


def pictures():
    return [(path.name, path.read_bytes()) for path in photos()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fifty_concurrent_uploads_are_all_answered(weights, tmp_path, backend):
    path = weights / "resnet18_64.npz"
    queue_limit = CONCURRENT - 2
    options = ["--weights", path, "--backend", backend, "--workers", 2, "--queue-limit", queue_limit]
    with running_server(tmp_path, *options) as server:
        url = server.url + "api/classify"
        # One at a time first: the answers every concurrent request must give again.
        available = pictures()
        expected = {}
        for name, data in available:
            status, body = post(url, [(name, data)])
            assert status == 200, body
            expected[name] = body["results"][0]["top"]
        if backend == "numpy":
            model = npresnet.load(path, backend="numpy")
            for name, data in available:
                want = npresnet.classify(data, model, topk=3)[0]
                assert [t["index"] for t in expected[name]] == [p.index for p in want]
                assert [t["label"] for t in expected[name]] == [p.label for p in want]
                got = [t["probability"] for t in expected[name]]
                np.testing.assert_allclose(got, [p.probability for p in want], rtol=1e-5)
        uploads = [available[i % len(available)] for i in range(CONCURRENT)]
        with ThreadPoolExecutor(CONCURRENT) as pool:
            answers = list(pool.map(lambda upload: post(url, [upload], timeout=120), uploads))
        errors = [body for _, body in answers if "error" in body]
        assert [status for status, _ in answers] == [200] * CONCURRENT, errors[:3]
        for (name, _), (_, body) in zip(uploads, answers):
            assert body["results"][0]["file"] == name
            assert body["results"][0]["top"] == expected[name]
        assert get(server.url + "healthz") == (200, {"ready": True})


def test_a_burst_past_the_queue_limit_gets_503_and_the_server_carries_on(weights, tmp_path):
    # workers 1 + queue 2: three requests inside at once; four photos at 224x224 keep each one busy a while.
    options = ["--weights", weights / "resnet18.npz", "--backend", "numpy", "--workers", 1, "--queue-limit", 2]
    with running_server(tmp_path, *options) as server:
        url = server.url + "api/classify"
        request = pictures()[:4]
        status, reference = post(url, request)
        assert status == 200, reference
        for _ in range(2):  # the allocator's steady state for this request
            assert post(url, request)[0] == 200
        time.sleep(1.5)  # idle: the server has returned its free memory
        rss_before = server.rss_kb()
        with ThreadPoolExecutor(BURST) as pool:
            answers = list(pool.map(lambda _: post(url, request, timeout=120), range(BURST)))
        statuses = [status for status, _ in answers]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) >= BURST // 2, statuses
        assert statuses.count(200) >= 1
        for status, body in answers:
            if status == 503:
                assert body["error"] == "the server is busy: 3 requests are already waiting or running; try again soon"
            else:
                assert [r["top"] for r in body["results"]] == [r["top"] for r in reference["results"]]
        # It carries on: the next request is answered, and correctly.
        status, after = post(url, request)
        assert status == 200
        assert [r["top"] for r in after["results"]] == [r["top"] for r in reference["results"]]
        # Refused requests hold nothing, and a second after the last request the server returns its free
        # memory to the OS: RSS comes back near where it was (a margin for allocator caches).
        limit = rss_before + 32 * 1024
        deadline = time.monotonic() + 10
        while server.rss_kb() > limit and time.monotonic() < deadline:
            time.sleep(0.2)
        rss_after, peak = server.rss_kb(), server.peak_rss_kb()
        print(f"server RSS (MB): {rss_before // 1024} before the burst, {rss_after // 1024} after, peak {peak // 1024}")
        assert rss_after <= limit, (rss_before, rss_after)
