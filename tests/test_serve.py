"""The web API through Flask's test client: the answers of npresnet.classify, and every error as JSON."""
import os
import re
import subprocess
import sys
import threading
import time
from importlib.util import find_spec

import numpy as np
import pytest
from PIL import Image

import npresnet
from image_files import encode, photos, png_header_only
from serve_client import multipart

WEB = find_spec("flask") is not None and find_spec("waitress") is not None
pytestmark = pytest.mark.skipif(not WEB, reason="npresnet serve needs the web extra: pip install 'npresnet[web]'")
if WEB:
    from npresnet.serve import create_app

SMALL = {"crop_size": 64, "resize_size": 72}  # TorchVision's preset at a small size: real preprocessing, fast forwards


def small_model(num_classes=1000, **meta):
    model = npresnet.build("resnet18", num_classes=num_classes, backend="numpy")
    model.meta.update(SMALL, **meta)
    return model


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def client(model):
    app = create_app(model, topk=3)
    app.extensions["npresnet"].warm_up()
    return app.test_client()


def upload(client, files, **fields):
    """POST [(file name, bytes)] to /api/classify -> the response. The body is made here, in memory: Werkzeug's
    test client would spool a large one to a temporary file itself."""
    body, content_type = multipart(files, fields)
    return client.post("/api/classify", data=body, content_type=content_type)


def as_json(predictions):
    return [{"index": p.index, "label": p.label, "probability": p.probability} for p in predictions]


def test_answers_are_those_of_classify(client, model):
    pictures = [(path.name, path.read_bytes()) for path in photos()]
    for name, data in pictures:  # one photo a request, as the page sends them
        response = upload(client, [(name, data)])
        assert response.status_code == 200, response.json
        (result,) = response.json["results"]
        assert result["file"] == name
        assert result["top"] == as_json(npresnet.classify(data, model, topk=3)[0])
        assert result["ms"] > 0
    # Several photos in one request are one batch, as npresnet.classify batches them.
    response = upload(client, pictures, topk="5")
    assert response.status_code == 200, response.json
    expected = npresnet.classify([data for _, data in pictures], model, topk=5)
    assert [r["top"] for r in response.json["results"]] == [as_json(top) for top in expected]


def test_class_names_from_the_weights_metadata():
    model = small_model(num_classes=3, classes=["cat", "rocket", "coffee"])
    app = create_app(model, topk=2)
    app.extensions["npresnet"].warm_up()
    response = upload(app.test_client(), [("cat.png", photos()[0].read_bytes())])
    assert response.status_code == 200, response.json
    top = response.json["results"][0]["top"]
    assert [t["label"] for t in top] == [["cat", "rocket", "coffee"][t["index"]] for t in top]
    assert len(top) == 2


def test_info_and_health(client):
    info = client.get("/api/info").json
    assert (info["arch"], info["backend"], info["num_classes"], info["topk"]) == ("resnet18", "numpy", 1000, 3)
    assert (info["preprocessing"]["crop_size"], info["preprocessing"]["resize_size"]) == (64, 72)
    assert info["max_upload_bytes"] == 20 * 1024 * 1024 and info["weights"] is None
    response = client.get("/healthz")
    assert (response.status_code, response.json) == (200, {"ready": True})


JPEG = encode(Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG", quality=90)
BAD_UPLOADS = {
    "not_an_image": ([("notes.png", b"these are not pixels\n")], "notes.png: not an image"),
    "empty": ([("empty.jpg", b"")], "empty.jpg: empty file"),
    "truncated": ([("half.jpg", JPEG[: len(JPEG) // 2])], "half.jpg: truncated"),
    "decompression_bomb": (
        [("bomb.png", png_header_only(20_000, 20_000))],
        "bomb.png: refused as a possible decompression bomb",
    ),
    "no_file": ([], "no image in the request"),
}


@pytest.mark.parametrize("files, words", BAD_UPLOADS.values(), ids=BAD_UPLOADS.keys())
def test_bad_uploads_are_400_with_a_message(client, files, words):
    response = upload(client, files)
    assert response.status_code == 400
    assert response.is_json and words in response.json["error"]


def test_bad_topk_is_400(client):
    response = upload(client, [("a.jpg", JPEG)], topk="many")
    assert response.status_code == 400 and "topk must be a positive integer" in response.json["error"]


def test_one_bad_photo_does_not_stop_the_others(client, model):
    response = upload(client, [("notes.png", b"not pixels"), ("red.jpg", JPEG)])
    assert response.status_code == 200
    bad, good = response.json["results"]
    assert bad == {"file": "notes.png", "error": "notes.png: not an image in a format npresnet reads (JPEG, PNG, WEBP, GIF, BMP, TIFF, PPM, AVIF)"}
    assert good["top"] == as_json(npresnet.classify(JPEG, model, topk=3)[0])


def test_upload_past_the_limit_is_413(model):
    app = create_app(model, max_upload_mb=0.01)  # 10 KiB
    app.extensions["npresnet"].warm_up()
    big = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))  # ~12 KB
    response = upload(app.test_client(), [("big.png", big)])
    assert response.status_code == 413
    assert response.json["error"] == "the upload is larger than the server's limit of 0.01 MB (--max-upload-mb)"


def test_uploads_are_never_written_to_disk(client):
    # Werkzeug spools file parts over 500 KB to a temporary file unless told otherwise: watch every open.
    written = []
    watching = threading.Event()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def audit(event, args):
        if watching.is_set() and event == "open":
            path, mode, flags = args
            if (mode and any(c in mode for c in "wax+")) or (flags and flags & write_flags):
                written.append(path)

    sys.addaudithook(audit)  # cannot be removed; inert once `watching` is cleared
    noise = np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    big = encode(Image.fromarray(noise))  # ~790 KB, incompressible
    watching.set()
    try:
        response = upload(client, [("noise.png", big)])
    finally:
        watching.clear()
    assert response.status_code == 200
    assert written == []


class GatedModel:
    """A model whose forward passes wait for `gate`: requests pile up as behind a slow model."""

    def __init__(self, model):
        self.model = model
        self.gate = threading.Event()
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x):
        self.calls += 1
        assert self.gate.wait(timeout=60)
        return self.model(x)


def wait_until(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_not_ready_before_the_warm_up(model):
    gated = GatedModel(model)
    app = create_app(gated)
    client = app.test_client()
    response = client.get("/healthz")
    assert (response.status_code, response.json) == (503, {"ready": False})
    response = upload(client, [("red.jpg", JPEG)])
    assert response.status_code == 503 and "warming up" in response.json["error"]
    gated.gate.set()
    app.extensions["npresnet"].warm_up()
    assert gated.calls == 1
    assert client.get("/healthz").status_code == 200
    assert upload(client, [("red.jpg", JPEG)]).status_code == 200


def test_a_full_queue_is_503_at_once_and_then_the_server_answers_again(model):
    gated = GatedModel(model)
    gated.gate.set()
    app = create_app(gated, workers=1, queue_limit=1)
    classifier = app.extensions["npresnet"]
    classifier.warm_up()
    gated.gate.clear()
    answers = {}

    def send(key):
        answers[key] = upload(app.test_client(), [("red.jpg", JPEG)])

    running = threading.Thread(target=send, args=("running",))
    running.start()
    wait_until(lambda: gated.calls == 2)  # the warm-up, then this request's forward pass, held at the gate
    waiting = threading.Thread(target=send, args=("waiting",))
    waiting.start()
    wait_until(lambda: classifier.in_flight == 2)
    start = time.monotonic()
    refused = upload(app.test_client(), [("red.jpg", JPEG)])
    assert time.monotonic() - start < 10  # answered while the other two still wait at the gate
    assert refused.status_code == 503
    assert refused.json == {"error": "the server is busy: 2 requests are already waiting or running; try again soon"}
    gated.gate.set()
    running.join(60)
    waiting.join(60)
    assert answers["running"].status_code == answers["waiting"].status_code == 200
    assert classifier.in_flight == 0
    again = upload(app.test_client(), [("red.jpg", JPEG)])
    assert again.status_code == 200 and again.json["results"][0]["top"] == answers["running"].json["results"][0]["top"]


def test_the_page_uses_only_what_the_server_serves(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
    html = page.get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert {"static/style.css", "static/app.js"} <= set(assets)
    for asset in assets:
        if asset.startswith("data:"):
            continue
        assert "//" not in asset, asset
        response = client.get("/" + asset)
        assert response.status_code == 200, asset
        assert not re.search(r"https?://", response.get_data(as_text=True)), f"{asset} loads something from elsewhere"
    assert re.search(r'<input id="file"[^>]*type="file"', html) and '<label for="file"' in html
    assert 'aria-live="polite"' in html


def test_without_the_web_extra_the_command_says_what_to_install():
    hide_flask = "import sys; sys.modules['flask'] = None; from npresnet.cli import main; sys.exit(main(['serve']))"
    result = subprocess.run([sys.executable, "-c", hide_flask], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == (
        "npresnet: error: npresnet serve needs Flask and waitress (flask is missing): pip install 'npresnet[web]'\n"
    )


def test_the_numpy_backend_is_thread_safe_as_it_says(model):
    # serve runs NumPy forward passes concurrently on its request threads because of this flag.
    assert model.backend.thread_safe
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    expected = model(x)
    outputs = []

    def run():
        outputs.extend(model(x) for _ in range(2))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(outputs) == 6
    for out in outputs:
        np.testing.assert_array_equal(out, expected)
