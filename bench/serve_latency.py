"""`npresnet serve` measured from a client: one request's latency, 50 concurrent uploads, a burst past the queue.

    python bench/serve_latency.py             # resnet18 and resnet50, NumPy and Numba backends
    python bench/serve_latency.py --quick     # resnet18, NumPy only

For each (architecture, backend): a fresh `npresnet serve` process on 127.0.0.1 with random weights
at 224x224 (TorchVision's preset; the answers are meaningless, the work is the same), one photo
posted 3 times to warm up, then 20 times one after another: the median wall time from the client
(multipart body built, request sent, JSON answer read) and the median of the server's own "ms".
Then, on resnet18 with each backend: 50 uploads at once (--queue-limit 48, --workers 2), and a
burst of 100 at once past --queue-limit 2 --workers 1: how many were answered and how, and the
server's RSS before, at peak and a few seconds after. Timings never decide a test; the tests check
the behaviour (tests/test_serve_server.py). The server and client helpers are the tests' own
(tests/serve_client.py). Writes bench/results/serve_latency.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from image_files import photos  # noqa: E402
from serve_client import post, running_server  # noqa: E402

RESULTS = HERE / "results"
REPEATS = 20
WARMUP = 3


def photo() -> tuple[str, bytes]:
    path = next(p for p in photos() if p.stem.startswith("chelsea"))
    return path.name, path.read_bytes()


def latency(folder: Path, arch: str, backend: str) -> dict:
    upload = photo()
    with running_server(folder, "--arch", arch, "--backend", backend) as server:
        url = server.url + "api/classify"
        for _ in range(WARMUP):
            assert post(url, [upload])[0] == 200
        client_ms, server_ms = [], []
        for _ in range(REPEATS):
            start = time.perf_counter()
            status, body = post(url, [upload])
            client_ms.append((time.perf_counter() - start) * 1000)
            assert status == 200, body
            server_ms.append(body["results"][0]["ms"])
    return {
        "arch": arch,
        "backend": backend,
        "client_ms_median": round(statistics.median(client_ms), 1),
        "client_ms_min": round(min(client_ms), 1),
        "server_ms_median": round(statistics.median(server_ms), 1),
    }


def concurrent(folder: Path, backend: str, count: int, workers: int, queue_limit: int) -> dict:
    upload = photo()
    args = ["--arch", "resnet18", "--backend", backend, "--workers", workers, "--queue-limit", queue_limit]
    with running_server(folder, *args) as server:
        url = server.url + "api/classify"
        for _ in range(WARMUP):
            assert post(url, [upload])[0] == 200
        time.sleep(1.5)  # idle: the server has handed back its free memory
        rss_before = server.rss_kb()

        def timed(_):
            start = time.perf_counter()
            status, body = post(url, [upload], timeout=300)
            return status, body, (time.perf_counter() - start) * 1000

        start = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            answers = list(pool.map(timed, range(count)))
        wall = time.perf_counter() - start
        after_status, _ = post(url, [upload])
        time.sleep(3)
        statuses = [status for status, _, _ in answers]
        answered = sorted(ms for status, _, ms in answers if status == 200)
        refused = sorted(ms for status, _, ms in answers if status == 503)
        return {
            "backend": backend,
            "requests": count,
            "workers": workers,
            "queue_limit": queue_limit,
            "ok": statuses.count(200),
            "busy_503": statuses.count(503),
            "other": len(statuses) - statuses.count(200) - statuses.count(503),
            "wall_s": round(wall, 2),
            "ok_ms_median": round(statistics.median(answered), 1) if answered else None,
            "ok_ms_max": round(answered[-1], 1) if answered else None,
            "busy_ms_median": round(statistics.median(refused), 1) if refused else None,
            "next_request_status": after_status,
            "rss_mb_before": round(rss_before / 1024),
            "rss_mb_peak": round(server.peak_rss_kb() / 1024),
            "rss_mb_after": round(server.rss_kb() / 1024),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="resnet18 with the NumPy backend only")
    args = parser.parse_args()
    backends = ["numpy"] + (["numba"] if find_spec("numba") and not args.quick else [])
    archs = ["resnet18"] + ([] if args.quick else ["resnet50"])
    load_before = os.getloadavg()[0]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_before": round(load_before, 2),
        "latency": [],
        "concurrent": [],
        "burst": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for arch in archs:
            for backend in backends:
                report["latency"].append(latency(folder, arch, backend))
                print(report["latency"][-1], flush=True)
        for backend in backends:
            report["concurrent"].append(concurrent(folder, backend, 50, workers=2, queue_limit=48))
            print(report["concurrent"][-1], flush=True)
            report["burst"].append(concurrent(folder, backend, 100, workers=1, queue_limit=2))
            print(report["burst"][-1], flush=True)
    report["load_after"] = round(os.getloadavg()[0], 2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "serve_latency.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    def show(value):
        return "-" if value is None else value

    lines = [
        f"Machine: {report['machine']}; {report['date']}; load average {report['load_before']} before, "
        f"{report['load_after']} after. One photo (chelsea.png, 451x300 PNG), 224x224, random weights.",
        "",
        "| model | backend | client ms (median of 20) | client ms (best) | server ms (median) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in report["latency"]:
        lines.append(f"| {r['arch']} | {r['backend']} | {r['client_ms_median']} | {r['client_ms_min']} | {r['server_ms_median']} |")
    lines += [
        "",
        "| resnet18 | backend | requests at once | workers + queue | 200 | 503 | other | wall s | 200 ms median / max | 503 ms median | next request | RSS MB before / peak / after |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in ("concurrent", "burst"):
        for r in report[kind]:
            lines.append(
                f"| {kind} | {r['backend']} | {r['requests']} | {r['workers']} + {r['queue_limit']} | {r['ok']} | {r['busy_503']} | "
                f"{r['other']} | {r['wall_s']} | {show(r['ok_ms_median'])} / {show(r['ok_ms_max'])} | {show(r['busy_ms_median'])} | "
                f"{r['next_request_status']} | {r['rss_mb_before']} / {r['rss_mb_peak']} / {r['rss_mb_after']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
