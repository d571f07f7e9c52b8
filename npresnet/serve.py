"""``npresnet serve``: a web page and a JSON API that classify uploaded photos.

    app = create_app(npresnet.load("resnet50.npz"), topk=3)   # a Flask app; app.test_client() in tests
    server = create_server(app, host="127.0.0.1", port=8000)  # waitress, bound; server.run() serves
    app.extensions["npresnet"].warm_up()                      # ready: /healthz answers 200

Routes: ``/`` the page (``npresnet/static/``: HTML, CSS and a script, nothing from
elsewhere); ``POST /api/classify`` (multipart field ``file``, one or more, optional
``topk``) -> ``{"results": [{"file", "top": [{"index", "label", "probability"}], "ms"}]}``,
the answers of ``npresnet.classify`` on the same bytes; ``GET /api/info``; ``GET /healthz``.
Every error is JSON ``{"error": message}``: 400 bad or missing image, 413 upload too
large, 503 queue full or model not yet warm.

Load and memory, and why:

* waitress reads a whole request body before a thread sees it; ``inbuf_overflow`` is
  raised to the body limit so that it keeps the body in memory rather than spooling it
  to a temporary file, and Werkzeug's multipart parser is given in-memory streams
  (``InMemoryRequest``): no upload is ever written to disk. waitress refuses a body of
  more than twice ``--max-upload-mb`` itself (a plain-text 413); Flask's
  ``MAX_CONTENT_LENGTH`` answers the JSON 413 below that.
* Admission (``Classifier.admit``): at most ``workers + queue_limit`` requests are
  inside the app at once; the next one gets 503 at once instead of waiting. waitress has
  a few more threads than that, so that a request past the limit is turned away without
  waiting for one, and accepts at most twice as many connections as it has threads (the
  rest wait in the kernel's listen queue, costing the server nothing): request bodies in
  memory are bounded by that count times the body limit.
* ``workers`` of the admitted requests at a time decode, preprocess and run the model
  (decoding a photo can take hundreds of MB); the rest wait their turn, in order.
* The model is shared. A backend whose ``thread_safe`` is False runs every forward pass
  on one thread of its own, so one at a time: the Numba backend's pool threads keep one
  set of scratch buffers each (two callers at once would share them), it sets OpenBLAS's
  process-wide thread count around each grouped convolution, and its own scratch buffers
  are per calling thread (one thread: one set, not one per request thread). The NumPy
  backend's ops are pure functions of their arguments, so its forward passes run
  concurrently on the request threads. Preprocessing runs on the request threads either way.
* After a burst the memory goes back to the OS: the request threads share two glibc heaps
  (``_limit_malloc_arenas``), and a second after the last request ``malloc_trim`` returns
  their free pages.

References: Flask's application factory pattern and ``MAX_CONTENT_LENGTH``; waitress's
``Adjustments`` (threads, connection_limit, inbuf_overflow, max_request_body_size).
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

try:
    from flask import Flask, jsonify, request
    from flask.wrappers import Request
    from waitress import create_server as _waitress_server
    from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge
except ImportError as exc:  # the `web` extra is not installed
    raise ImportError(
        f"npresnet serve needs Flask and waitress ({exc.name} is missing): pip install 'npresnet[web]'"
    ) from exc

from .predict import Prediction, labels_for, top_k
from .preprocess import ImageError, describe, preset_for

DEFAULT_TOPK = 3
DEFAULT_WORKERS = 2
DEFAULT_QUEUE_LIMIT = 16
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_BATCH_SIZE = 16
SPARE_THREADS = 4  # waitress threads beyond the admitted requests: they answer 503s, /healthz, the page
IDLE_SECONDS = 1.0  # idle this long after a request, the server hands freed memory back to the OS
M_ARENA_MAX = -8  # glibc's malloc.h
MALLOC_ARENAS = 2
FILE_FIELD = "file"


class Busy(Exception):
    """Every admission slot is taken: the request is turned away with 503."""


class NotReady(Exception):
    """The model has not finished its warm-up forward pass."""


def _glibc(name: str):
    """A function of glibc's malloc by name, or None under another C library or OS."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError, TypeError):
        return None


def _limit_malloc_arenas() -> None:
    """At most MALLOC_ARENAS glibc heaps for the threads started after this (process-wide, like MALLOC_ARENA_MAX).

    Forward passes run on whichever waitress thread took the request, and glibc gives each thread
    a heap of its own (up to 8 per core) that keeps what it frees, large arrays included once its
    mmap threshold has risen: after a burst every thread held a forward pass's worth of memory
    (resnet18, 7 threads: 300 MB at rest, 515 MB after bursts; with 2 heaps, 145 MB and back to 145).
    """
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(M_ARENA_MAX, MALLOC_ARENAS)


class InMemoryRequest(Request):
    """Werkzeug spools file parts over 500 KB to a temporary file; this keeps them in memory."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


class Classifier:
    """The shared model behind the page: admission, warm-up, and the answers for uploaded bytes."""

    def __init__(
        self,
        model: Any,
        *,
        topk: int = DEFAULT_TOPK,
        workers: int = DEFAULT_WORKERS,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        batch_size: int = DEFAULT_BATCH_SIZE,
        exif_transpose: bool = False,
    ):
        if min(topk, workers, batch_size) < 1 or queue_limit < 0:
            raise ValueError(
                f"topk, workers and batch_size must be at least 1 and queue_limit at least 0, "
                f"not {topk}, {workers}, {batch_size}, {queue_limit}"
            )
        self.model = model
        self.topk = topk
        self.workers = workers
        self.queue_limit = queue_limit
        self.batch_size = batch_size
        self.preset = preset_for(model, exif_transpose=exif_transpose)
        # The user's class names when the weights carry them (fine-tuned heads), else labels_for's default.
        self.labels = labels_for(model, model.meta.get("classes") or None)
        self.ready = threading.Event()
        self.warm_up_error: str | None = None
        self.in_flight = 0  # admitted requests, waiting or working
        self._count_lock = threading.Lock()
        self._working = threading.Semaphore(workers)
        thread_safe = getattr(model.backend, "thread_safe", False)
        self._model_thread = None if thread_safe else ThreadPoolExecutor(1, thread_name_prefix="forward")
        self._went_idle = threading.Event()
        # Freed memory goes back to the OS (glibc's malloc_trim) once no request has run for IDLE_SECONDS.
        self._trim = _glibc("malloc_trim")
        if self._trim is not None:
            threading.Thread(target=self._release_memory_when_idle, name="release-memory", daemon=True).start()

    # --- lifecycle --------------------------------------------------------------------------------

    def warm_up(self) -> float:
        """One forward pass at the preprocessed size (folds the weights, loads or compiles kernels); then ready.

        Returns the seconds it took. A failure is kept in warm_up_error (shown by /healthz) and re-raised.
        """
        start = time.perf_counter()
        crop = self.preset.crop_size
        try:
            self.forward(np.zeros((1, 3, crop, crop), dtype=np.float32))
        except Exception as exc:
            self.warm_up_error = f"{type(exc).__name__}: {exc}"
            raise
        self.ready.set()
        return time.perf_counter() - start

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """The model's logits for a batch: on the model's own thread unless its backend is thread-safe."""
        if self._model_thread is None:
            return self.model(batch)
        return self._model_thread.submit(self.model, batch).result()

    @contextlib.contextmanager
    def admit(self):
        """Hold one of the workers + queue_limit slots for the request; Busy at once when none is free."""
        if not self.ready.is_set():
            raise NotReady
        with self._count_lock:
            if self.in_flight >= self.workers + self.queue_limit:
                raise Busy
            self.in_flight += 1
        try:
            yield
        finally:
            with self._count_lock:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self._went_idle.set()

    def _release_memory_when_idle(self) -> None:
        """Trim the heap once the server has been idle for IDLE_SECONDS (never while requests run)."""
        while True:
            self._went_idle.wait()
            self._went_idle.clear()
            time.sleep(IDLE_SECONDS)
            if self.in_flight == 0 and not self._went_idle.is_set():
                self._trim(0)

    # --- answers ----------------------------------------------------------------------------------

    def classify(self, uploads: list[tuple[str, bytes]], topk: int) -> list[dict[str, Any]]:
        """[(file name, bytes)] -> per file {"file", "top", "ms"} or {"file", "error"}, in order.

        Images are batched by batch_size as npresnet.classify batches them. "ms" is the server's
        time for the file: decoding and preprocessing it, plus its batch's forward pass.
        """
        results: list[dict[str, Any]] = []
        with self._working:
            pending: list[tuple[dict[str, Any], np.ndarray, float]] = []
            for name, data in uploads:
                start = time.perf_counter()
                try:
                    array = self.preset(data)  # (3, crop, crop)
                except ImageError as exc:
                    results.append({"file": name, "error": _message_for(name, data, exc)})
                    continue
                entry: dict[str, Any] = {"file": name}
                results.append(entry)
                pending.append((entry, array, time.perf_counter() - start))
                if len(pending) == self.batch_size:
                    self._answer(pending, topk)
                    pending = []
            if pending:
                self._answer(pending, topk)
        return results

    def _answer(self, pending: list[tuple[dict[str, Any], np.ndarray, float]], topk: int) -> None:
        batch = np.stack([array for _, array, _ in pending])  # (B, 3, crop, crop)
        start = time.perf_counter()
        logits = self.forward(batch)  # (B, num_classes)
        forward = time.perf_counter() - start
        for (entry, _, seconds), predictions in zip(pending, top_k(logits, self.labels, topk)):
            entry["top"] = [_as_json(p) for p in predictions]
            entry["ms"] = round((seconds + forward) * 1000, 1)

    def info(self) -> dict[str, Any]:
        preset = self.preset
        return {
            "arch": self.model.arch,
            "backend": self.model.backend.name,
            "num_classes": self.model.num_classes,
            "topk": self.topk,
            "preprocessing": {
                "crop_size": preset.crop_size,
                "resize_size": preset.resize_size,
                "interpolation": preset.interpolation,
                "mean": list(preset.mean),
                "std": list(preset.std),
                "exif_transpose": preset.exif_transpose,
            },
            "workers": self.workers,
            "queue_limit": self.queue_limit,
            "ready": self.ready.is_set(),
        }


def _as_json(p: Prediction) -> dict[str, Any]:
    return {"index": p.index, "label": p.label, "probability": p.probability}


def _message_for(name: str, data: bytes, exc: ImageError) -> str:
    """ImageError names the bytes ("<123 bytes>: ..."); the user knows the file by its name."""
    message = str(exc)
    prefix = f"{describe(data)}: "
    return f"{name}: {message[len(prefix):] if message.startswith(prefix) else message}"


def _error(status: int, message: str, **extra):
    response = jsonify({"error": message, **extra})
    response.status_code = status
    return response


def create_app(
    model: Any,
    *,
    topk: int = DEFAULT_TOPK,
    workers: int = DEFAULT_WORKERS,
    queue_limit: int = DEFAULT_QUEUE_LIMIT,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    batch_size: int = DEFAULT_BATCH_SIZE,
    exif_transpose: bool = False,
    weights: str | None = None,
) -> Flask:
    """The Flask app of ``npresnet serve`` around a loaded model (not yet warm: call warm_up).

    weights: how the page names the weights (a file name), or None for random parameters.
    app.extensions["npresnet"] is the Classifier; app.config["MAX_CONTENT_LENGTH"] the upload limit.
    """
    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be positive, not {max_upload_mb}")
    classifier = Classifier(
        model, topk=topk, workers=workers, queue_limit=queue_limit, batch_size=batch_size, exif_transpose=exif_transpose
    )
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 1024 * 1024)
    app.config["MAX_UPLOAD_MB"] = max_upload_mb  # as the user gave it, for messages
    app.json.sort_keys = False
    app.extensions["npresnet"] = classifier

    @app.get("/")
    def page():
        return app.send_static_file("index.html")

    @app.get("/healthz")
    def healthz():
        if classifier.ready.is_set():
            return jsonify({"ready": True})
        body = {"ready": False}
        if classifier.warm_up_error:
            body["error"] = f"warm-up failed: {classifier.warm_up_error}"
        return jsonify(body), 503

    @app.get("/api/info")
    def info():
        return jsonify({**classifier.info(), "weights": weights, "max_upload_bytes": app.config["MAX_CONTENT_LENGTH"]})

    @app.post("/api/classify")
    def classify():
        try:
            with classifier.admit():
                k = _topk_from(request, classifier.topk)
                uploads = [(part.filename, part.read()) for part in request.files.getlist(FILE_FIELD)]
                # A form whose file input was left empty still sends a part, with no file name and no bytes.
                uploads = [(name or "upload", data) for name, data in uploads if name or data]
                if not uploads:
                    return _error(400, f"no image in the request: send files in the multipart field '{FILE_FIELD}'")
                results = classifier.classify(uploads, k)
        except NotReady:
            return _error(503, "the model is still warming up; try again in a moment", ready=False)
        except Busy:
            limit = classifier.workers + classifier.queue_limit
            return _error(503, f"the server is busy: {limit} requests are already waiting or running; try again soon")
        if all("error" in r for r in results):
            return _error(400, "; ".join(r["error"] for r in results), results=results)
        return jsonify({"results": results})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if isinstance(exc, RequestEntityTooLarge):
            limit = app.config["MAX_UPLOAD_MB"]
            return _error(413, f"the upload is larger than the server's limit of {limit:g} MB (--max-upload-mb)")
        return _error(exc.code or 500, exc.description or exc.name)

    @app.after_request
    def headers(response):
        # The page uses only what npresnet serves; previews are blob: URLs of the user's own files.
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    return app


def _topk_from(req, default: int) -> int:
    text = req.form.get("topk") or req.args.get("topk")
    if text is None:
        return default
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise BadRequest(f"topk must be a positive integer, not {text!r}")
    return k


def create_server(app: Flask, host: str = "127.0.0.1", port: int = 8000):
    """A waitress server bound to host:port (port 0: a free one, see .effective_port); .run() serves, .close() stops.

    Threads and limits follow the app's Classifier and upload limit (see the module docstring).
    """
    classifier: Classifier = app.extensions["npresnet"]
    _limit_malloc_arenas()
    threads = classifier.workers + classifier.queue_limit + SPARE_THREADS
    body_limit = 2 * app.config["MAX_CONTENT_LENGTH"] + 1024 * 1024
    return _waitress_server(
        app,
        host=host,
        port=port,
        threads=threads,
        connection_limit=2 * threads,
        max_request_body_size=body_limit,
        inbuf_overflow=body_limit + 1,
        channel_timeout=30,
        ident="npresnet",
    )
