"""A real `npresnet serve` process for the tests, and a small HTTP client for it (urllib: no extra packages)."""
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

STARTUP_SECONDS = 180  # a cold Numba kernel cache compiles for most of a minute on a busy 2-core machine


def multipart(files, fields=None) -> tuple[bytes, str]:
    """[(file name, bytes)] in the field "file", plus plain fields -> (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def post(url: str, files, fields=None, timeout: float = 120) -> tuple[int, dict]:
    """POST files to url -> (status, JSON body); HTTP errors are answers too."""
    body, content_type = multipart(files, fields)
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str, timeout: float = 10) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT/
    process: subprocess.Popen
    log: Path

    def rss_kb(self) -> int:
        return _status_kb(self.process.pid, "VmRSS")

    def peak_rss_kb(self) -> int:
        return _status_kb(self.process.pid, "VmHWM")


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise KeyError(key)


@contextlib.contextmanager
def running_server(folder: Path, *args):
    """`npresnet serve --port 0 ARGS` on 127.0.0.1, yielded once /healthz says ready; always stopped after."""
    log = folder / f"serve-{uuid.uuid4().hex[:8]}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "npresnet", "serve", "--host", "127.0.0.1", "--port", "0", *map(str, args)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        url = None
        while time.monotonic() < deadline:
            assert process.poll() is None, f"npresnet serve exited early:\n{log.read_text()}"
            if url is None:
                lines = [line for line in log.read_text().splitlines() if " at http://" in line]
                url = lines[0].split(" at ")[-1].strip() if lines else None
            elif get(url + "healthz")[0] == 200:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"npresnet serve was not ready within {STARTUP_SECONDS} s:\n{log.read_text()}")
        yield Server(url, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
