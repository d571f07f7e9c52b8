"""The side-by-side benchmark: npresnet's backends against torch eager and ONNX Runtime.

    python bench/run.py                 # resnet18 and resnet50, batch 1 and 8, 2 threads
    python bench/run.py --quick         # resnet18 batch 1 only, fewer repeats (for development)

Reported per case: wall ms per batch (the median of calls made back to back), images/s, the ratio to
torch's wall time, CPU ms per batch (all threads; steadier than wall time on a shared
machine), the wall ms of a call made after 0.2 s idle (a lone request's latency), first-call ms and
peak RSS. Every (runner, architecture, batch) is timed in its own fresh process, so that
first-call time (compilation, cache loading, weight preparation) and peak
resident memory (ru_maxrss) belong to that runner alone. Each process builds
the model, runs one first call, `--warmup` more calls, then one timed call per turn
(below); the median is reported. All runners compute the same architecture with
random weights at 224x224 float32. Before it is timed, each runner's first output is
checked against the NumPy backend's logits for the same input (the int8 runners against
npresnet's int8 network): off by more than float32 tolerance (1e-4 of the largest logit),
the bench stops, naming the runner (`check_output`); a wrong answer is never timed.

Start-up, for every CPU backend (numpy, numba), torch and ONNX Runtime: a fresh process
imports, loads resnet18 (.npz; the exported .onnx for ONNX Runtime) and classifies one
photo, wall time from outside, twice: with an empty kernel cache (a new $NPRESNET_HOME)
and then with the cache the first run left; numba's two rows wait for the kernels to be built
(NPRESNET_KERNEL_BUILD=wait, as every timed worker here), and a third row is a user's first run,
the kernels built in the background, with the time until its builder has finished. Then
`npresnet classify` one photo, backend auto.

Runners: every npresnet backend that can run here (numpy, numba), torch eager
when torch is installed, ONNX Runtime when onnxruntime and onnx are installed,
on the file `npresnet export` writes (npresnet.export_onnx: batch norm folded,
dynamic axes; until 2026-12 this was torch.onnx.export of the torch model, which
folds batch norm the same way, so the rows compare). The sizes of the files a
user ships (.npz in float32 and float16, .onnx) are listed under the table. Thread counts are pinned through the
environment (OMP/OPENBLAS/MKL/NUMBA/NPRESNET) and each library's own knob.

INT8 rows: "numpy-int8" is npresnet's quantized network (npresnet.quantize: int8 weights, activation
scales calibrated on the two photos in tests/data, which is enough for timing), "onnxruntime-int8" the
QDQ ONNX file `npresnet export` writes of it, which onnxruntime fuses into QLinearConv int8 kernels.
Both files are made once per architecture, before the timing; their sizes join the file-size table.

This machine's speed drifts by 20-40% over minutes, so the runners of one case (architecture, batch) are
timed taking turns (after a pause, one call "after idle" and CALLS_PER_TURN back to back each, until
`--repeats` back-to-back calls), each in its own process, all alive meanwhile (`time_case`): every
runner's median covers the same minutes. Every call's time is in the JSON (`call_ms`,
`after_idle_call_ms`).

Results: bench/results/<name>.json, <name>.md and, with matplotlib, <name>.png.
bench/ is not part of the test suite: timings never decide pass or fail.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # run as a script it is; loaded by path (tests/test_bench_check.py) it is not
    sys.path.insert(0, str(HERE))
import turns  # noqa: E402
RESULTS = HERE / "results"
SIZE = 224


# --- worker side: one runner, one model, one batch, in this process --------------------------


def _npresnet_runner(backend: str, arch: str, threads: int):
    import numpy as np

    import npresnet

    model = npresnet.build(arch, backend=backend, threads=threads)
    return lambda x: model(x), np.asarray


def _torch_model(arch: str):
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from torch_resnet import torch_resnet

    from npresnet.specs import get_spec

    import npresnet

    # npresnet's random weights (build's seed), so that its logits can be checked against the NumPy backend's.
    model = torch_resnet(get_spec(arch)).eval()
    state = npresnet.build(arch, backend="numpy").state_dict()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return model


def _torch_runner(arch: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    model = _torch_model(arch)

    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run, None


def _onnxruntime_runner(arch: str, threads: int, onnx_path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0], None


def int8_paths(folder: str, arch: str) -> tuple[str, str]:
    """Where the int8 .npz and its QDQ .onnx of `arch` are written (quantize_files) and read (worker)."""
    return os.path.join(folder, f"{arch}-int8.npz"), os.path.join(folder, f"{arch}-int8.onnx")


# Logits within this much of the NumPy backend's, relative to their largest magnitude (float32: tests/helpers.py),
# else the runner is not timed. The int8 runners are checked against npresnet's int8 network instead.
FLOAT32_TOLERANCE = 1e-4
INT8_TOLERANCE = 2e-2  # two quantized networks that round some activations differently (1-2 steps of a scale)


def bench_input(batch: int):
    import numpy as np

    return np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)


def reference_worker(arch: str, batch: int, int8_npz: str, path: str) -> dict:
    """The logits every runner is checked against: the NumPy backend's (float), npresnet's int8 network (int8)."""
    import numpy as np

    import npresnet

    x = bench_input(batch)
    logits = {"float": npresnet.build(arch, backend="numpy")(x)}
    if os.path.exists(int8_npz):
        logits["int8"] = npresnet.load(int8_npz, backend="numpy")(x)
    np.savez(path, **logits)
    return {}


def check_output(runner: str, out, reference_path: str) -> None:
    """SystemExit naming the runner when its logits are off the reference by more than the tolerance."""
    import numpy as np

    if not reference_path:
        return
    with np.load(reference_path) as references:
        int8 = runner.endswith("-int8")
        want = references["int8" if int8 else "float"]
    tolerance = INT8_TOLERANCE if int8 else FLOAT32_TOLERANCE
    error = float(np.max(np.abs(np.asarray(out, dtype=np.float64) - want)) / max(float(np.max(np.abs(want))), 1e-30))
    if not error <= tolerance:  # NaN fails too
        reference = "npresnet's int8 network" if int8 else "the NumPy backend"
        raise SystemExit(f"bench: runner {runner!r} is off {reference} by {error:.2e} (relative; allowed {tolerance:.0e}): not timed")


def worker(runner: str, arch: str, batch: int, threads: int, warmup: int, onnx_path: str, reference_path: str = "") -> None:
    """Build, call once (checked against the reference), warm up, then say "ready"; then one timed call per
    "time" line on stdin, and "done" for the peak memory. Every reply is one JSON line on stdout."""
    start = time.perf_counter()
    int8_npz, int8_onnx = int8_paths(os.path.dirname(onnx_path), arch)  # beside the float32 .onnx
    if runner == "torch":
        run, _ = _torch_runner(arch, threads)
    elif runner == "onnxruntime":
        run, _ = _onnxruntime_runner(arch, threads, onnx_path)
    elif runner == "onnxruntime-int8":
        run, _ = _onnxruntime_runner(arch, threads, int8_onnx)
    elif runner == "numpy-int8":
        import npresnet

        model = npresnet.load(int8_npz, backend="numpy", threads=threads)
        run = model
    else:
        run, _ = _npresnet_runner(runner, arch, threads)
    build_s = time.perf_counter() - start
    x = bench_input(batch)
    start = time.perf_counter()
    out = run(x)
    first_s = time.perf_counter() - start
    assert out.shape == (batch, 1000), out.shape
    check_output(runner, out, reference_path)
    for _ in range(warmup):
        run(x)
    turns.say({"ready": True, "build_s": build_s, "first_call_ms": first_s * 1e3})

    def turn():
        walls, cpus = [], []
        for _ in range(1 + CALLS_PER_TURN):  # the first after the pause (idle), then back to back
            start, cpu_start = time.perf_counter(), time.process_time()
            run(x)
            walls.append(time.perf_counter() - start)
            # CPU time of all this process's threads: less sensitive than wall time to other jobs on the
            # machine (but counting any spin-waiting of the runner's thread pool).
            cpus.append(time.process_time() - cpu_start)
        return {"idle_s": walls[0], "s": walls[1:], "cpu_s": cpus[1:]}

    turns.serve("time", turn)


def time_case(arch: str, batch: int, runners: list[str], args, tmp: str, reference: str) -> list[dict]:
    """Every runner of one (arch, batch) in a process of its own, all alive at once, built one after another
    (so that first-call times do not overlap); then they take turns, `repeats` turns, with a pause before
    each (so that no thread pool still spinning from one runner slows the next). In a turn a runner makes
    one call after the pause (its time: "after idle", what a request that arrives alone meets) and
    CALLS_PER_TURN calls back to back (ms/batch: the median of these). This machine's speed drifts by
    20-40% over minutes: runners timed one after the other measured the drift as much as themselves;
    taking turns, each median covers the same minutes."""
    workers, results = {}, []
    try:
        for runner in runners:
            worker_args = ["--worker", runner, arch, str(batch), "--threads", str(args.threads), "--warmup",
                           str(args.warmup), "--onnx", os.path.join(tmp, f"{arch}.onnx"), "--reference", reference]
            w = turns.Worker(__file__, worker_args, args.threads)
            if "error" in w.ready:
                if w.ready["error"].startswith("bench: runner"):
                    raise SystemExit(w.ready["error"])  # a wrong answer is never timed, nor left in a table
                results.append({"runner": runner, "arch": arch, "batch": batch, "error": w.ready["error"]})
                continue
            workers[runner] = (w, {"s": [], "cpu_s": [], "idle_s": []})
        for _ in range(-(-args.repeats // CALLS_PER_TURN)):
            for runner, (w, got) in workers.items():
                time.sleep(TURN_PAUSE_S)
                r = w.ask("time")
                if "error" in r:
                    raise SystemExit(f"bench: the {runner} worker ({arch}, batch {batch}) died: {r['error']}")
                got["s"] += r["s"]
                got["cpu_s"] += r["cpu_s"]
                got["idle_s"].append(r["idle_s"])
        for runner, (w, got) in workers.items():
            median = statistics.median(got["s"])
            results.append({
                "runner": runner, "arch": arch, "batch": batch, "threads": args.threads,
                "build_s": w.ready["build_s"], "first_call_ms": w.ready["first_call_ms"],
                "ms_per_batch": median * 1e3, "min_ms": min(got["s"]) * 1e3,
                "cpu_ms_per_batch": statistics.median(got["cpu_s"]) * 1e3, "images_per_s": batch / median,
                "after_idle_ms": statistics.median(got["idle_s"]) * 1e3,
                "peak_rss_mb": w.close()["peak_rss_mb"], "repeats": len(got["s"]),
                "call_ms": [t * 1e3 for t in got["s"]], "after_idle_call_ms": [t * 1e3 for t in got["idle_s"]],
            })
            print(f"{arch:10s} b{batch:<3d} {runner:16s} {median * 1e3:8.1f} ms", flush=True)
    finally:
        for w, _ in workers.values():
            w.kill()
    return results


# The pause before each runner's turn: OpenBLAS and OpenMP pools spin for tens of milliseconds after a
# call, on the cores the next runner needs.
TURN_PAUSE_S = 0.2
# Calls back to back in each turn, after the one that follows the pause.
CALLS_PER_TURN = 2


def startup_worker(weights: str, runner: str, threads: int, photo: str) -> dict:
    """What classifying one photo costs in a fresh process: import, load the weights (.npz; .onnx for
    ONNX Runtime; torch reads the .npz's arrays), preprocess and one forward pass (wall, from inside)."""
    start = time.perf_counter()
    import numpy as np

    from npresnet.preprocess import preprocess

    if runner == "onnxruntime":
        run, _ = _onnxruntime_runner("", threads, weights)
        name = runner
    elif runner == "torch":
        import torch

        sys.path.insert(0, str(ROOT / "tests"))
        from torch_resnet import torch_resnet

        from npresnet.specs import get_spec

        torch.set_num_threads(threads)
        with np.load(weights, allow_pickle=False) as arrays:
            state = {k: torch.from_numpy(arrays[k]) for k in arrays.files if k != "__meta__"}
        model = torch_resnet(get_spec("resnet18")).eval()
        model.load_state_dict(state)

        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()

        name = runner
    else:
        import npresnet

        model = npresnet.load(weights, backend=runner, threads=threads)
        run, name = model, model.backend.name
    top = int(np.argmax(run(preprocess([photo]))[0]))
    return {"backend": name, "top": top, "inside_s": time.perf_counter() - start, "peak_rss_mb": turns.peak_rss_mb()}


def sizes_worker(arch: str, folder: str) -> dict:
    """MB on disk of `arch` (random weights) as .npz in float32 and float16, and as .onnx (float32) when onnx is here."""
    import npresnet

    model = npresnet.build(arch, backend="numpy")
    paths = {kind: os.path.join(folder, f"{arch}-{name}") for kind, name in
             (("npz float32", "f32.npz"), ("npz float16", "f16.npz"), ("onnx float32", "f32.onnx"))}
    npresnet.save(model, paths["npz float32"])
    npresnet.save(model, paths["npz float16"], dtype="float16")
    if _has("onnx"):
        npresnet.export_onnx(model, paths["onnx float32"])
    else:
        del paths["onnx float32"]
    return {kind: os.path.getsize(path) / 1e6 for kind, path in paths.items()}


# --- parent side: which runners exist, one process each, the tables ----------------------------


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def available_runners() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from npresnet.backends import available_backends

    runners = [b for b in available_backends() if b != "cuda"]
    if _has("torch"):
        runners.append("torch")
    if _has("onnxruntime") and _has("onnx"):
        runners.append("onnxruntime")
    runners.append("numpy-int8")
    if _has("onnxruntime") and _has("onnx"):
        runners.append("onnxruntime-int8")
    return runners


def quantize_files(arch: str, folder: str, threads: int) -> dict:
    """The int8 .npz of `arch` (random weights, calibrated on tests/data's photos) and, with onnx, its QDQ export."""
    npz, onnx = int8_paths(folder, arch)
    photos = sorted(str(p) for p in (ROOT / "tests" / "data").iterdir() if p.suffix in (".png", ".jpg"))
    code = (
        f"import npresnet, importlib.util; m = npresnet.build({arch!r}, backend='numpy'); "
        f"q = npresnet.quantize(m, {photos!r}); npresnet.save(q, {npz!r}); "
        f"importlib.util.find_spec('onnx') and npresnet.export_onnx(q, {onnx!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=turns.pinned_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "quantize failed"}
    return {}


def file_sizes(archs: list[str], tmp: str, threads: int) -> dict:
    """{arch: {file kind: MB}} for the files a user ships, each architecture written in a process of its own."""
    return {arch: _run_json(["--sizes-worker", arch, tmp], threads) for arch in archs}


def _run_json(args: list[str], threads: int, timeout: float = 900, env: dict | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        env={**turns.pinned_env(threads), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export_onnx(arch: str, path: str, threads: int) -> dict:
    """npresnet's own export (no torch), in a process of its own."""
    code = f"import npresnet; npresnet.export_onnx(npresnet.build({arch!r}, backend='numpy'), {path!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=turns.pinned_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "export failed"}
    return {}


STARTUP_PHOTO = ROOT / "tests" / "data" / "chelsea_small.png"


def measure_startup(runners: list[str], threads: int, tmp: str) -> dict:
    """{runner: {"empty": ..., "warm": ...}}: a fresh process classifying one photo with resnet18, wall time
    from outside, first with an empty kernel cache (a new $NPRESNET_HOME), then again with what it left
    (the same for runners that compile nothing: their row shows the noise). Then the CLI, backend auto."""
    weights = os.path.join(tmp, "resnet18.npz")
    onnx = os.path.join(tmp, "resnet18-startup.onnx")
    code = "import sys; sys.path.insert(0, %r); import npresnet; npresnet.save(npresnet.resnet18(backend='numpy'), %r)"
    subprocess.run([sys.executable, "-c", code % (str(ROOT), weights)], env=turns.pinned_env(threads), check=True)
    results = {}
    for runner in runners:
        path = weights
        if runner == "onnxruntime":
            if "error" in export_onnx("resnet18", onnx, threads):
                continue
            path = onnx
        env = _empty_home(os.path.join(tmp, f"home-{runner}"))
        row = {}
        for cache in ("empty", "warm"):
            start = time.perf_counter()
            result = _run_json(["--startup-worker", path, "--startup-backend", runner, "--startup-photo", str(STARTUP_PHOTO)],
                               threads, env=env)
            row[cache] = {**result, "wall_s": time.perf_counter() - start}
        results[runner] = row
        if runner == "numba":  # the rows above waited for the kernels (pinned_env); a user's run does not
            results["numba, kernels built in the background"] = _background_startup(path, threads, tmp, env)
    # The command itself, as a user runs it (backend auto), with the numba runner's warm cache.
    code = (
        "import json, resource, sys; from npresnet.cli import main; "
        f"status = main(['classify', '--weights', {weights!r}, '--topk', '1', {str(STARTUP_PHOTO)!r}]); "
        "print(json.dumps({'status': status, 'backend': 'cli auto', "
        "'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))"
    )
    env = {"NPRESNET_HOME": os.path.join(tmp, "home-numba")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env={**turns.pinned_env(threads), **env}, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if proc.returncode == 0:
        results["`npresnet classify` one photo"] = {"warm": {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall_s}}
    else:
        results["`npresnet classify` one photo"] = {"warm": {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}}
    return results


def _empty_home(home: str) -> dict:
    """The variables that give a start-up run the kernel cache under `home` (a new folder: empty)."""
    env = {"NPRESNET_HOME": home}
    if "NUMBA_CACHE_DIR" in os.environ:  # it would win over NPRESNET_HOME
        env["NUMBA_CACHE_DIR"] = os.path.join(home, "numba")
    return env


def _background_startup(weights: str, threads: int, tmp: str, waited_env: dict) -> dict:
    """The numba runner's empty-cache start-up as a user meets it (NPRESNET_KERNEL_BUILD unset: the kernels
    are built in the background while NumPy runs their layers), then how long until the builder has left
    in the cache every object the waiting run built (polled from outside: the builder outlives the run)."""
    home = os.path.join(tmp, "home-numba-background")
    env = {**_empty_home(home), "NPRESNET_KERNEL_BUILD": "background"}

    def objects(home_dir):
        return {os.path.basename(p) for p in glob.glob(os.path.join(home_dir, "**", "*.o"), recursive=True)}

    expected = objects(waited_env["NPRESNET_HOME"])
    start = time.perf_counter()
    result = _run_json(["--startup-worker", weights, "--startup-backend", "numba", "--startup-photo", str(STARTUP_PHOTO)],
                       threads, env=env)
    row = {"empty": {**result, "wall_s": time.perf_counter() - start}}
    while not expected <= objects(home) and time.perf_counter() - start < 300:
        time.sleep(0.1)
    row["kernels_ready_s"] = time.perf_counter() - start if expected <= objects(home) else None
    time.sleep(BUILDER_EXIT_S)  # the builder's idle wait, so that it is gone before the next measurement
    return row


# How long a builder that has nothing left to build lingers (npresnet_kernels.aot.BUILDER_IDLE_S), with margin.
BUILDER_EXIT_S = 3.0


def startup_runners(runners: list[str]) -> list[str]:
    """The runners whose start-up is measured: npresnet's CPU backends, torch, ONNX Runtime (float32)."""
    return [r for r in ("numpy", "numba", "torch", "onnxruntime") if r in runners]


def markdown(results: list[dict], startup: dict, meta: dict, sizes: dict | None = None) -> str:
    torch_ms = {(r["arch"], r["batch"]): r["ms_per_batch"] for r in results if r["runner"] == "torch" and "error" not in r}
    lines = [
        f"Machine: {meta['machine']}; {meta['threads']} threads; {SIZE}x{SIZE} float32; "
        f"median of {meta['repeats']} after {meta['warmup']} warm-up calls; each row its own process; "
        f"the runners of each case taking turns (a {TURN_PAUSE_S} s pause, one call after idle, {CALLS_PER_TURN} back to back); load average {meta['load_average'][0]:.1f} before, "
        f"{meta['load_average_after'][0]:.1f} after; {meta['date']}.",
        "",
        "| model | batch | runner | ms/batch | images/s | ratio to torch | CPU ms/batch | after idle ms | first call ms | peak RSS MB |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['batch']} | {r['runner']} | error: {r['error']} | | | | | | |")
            continue
        base = torch_ms.get((r["arch"], r["batch"]))
        ratio = f"{r['ms_per_batch'] / base:.2f}" if base else "n/a"
        lines.append(
            f"| {r['arch']} | {r['batch']} | {r['runner']} | {r['ms_per_batch']:.1f} | {r['images_per_s']:.1f} | "
            f"{ratio} | {r['cpu_ms_per_batch']:.1f} | {r['after_idle_ms']:.1f} | {r['first_call_ms']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    if startup:
        numpy_warm = startup.get("numpy", {}).get("warm", {}).get("wall_s")
        lines += [
            "",
            "Start-up: a fresh process imports, loads resnet18 (.npz; .onnx for ONNX Runtime) and classifies one "
            "photo (224x224); wall s from outside, with an empty kernel cache and with the one the first run left. "
            "The numba rows wait for their kernels (NPRESNET_KERNEL_BUILD=wait), except the one built in the "
            "background, as a user's first run is (its layers run on NumPy until their kernels are ready):",
            "",
            "| runner | empty cache s | warm cache s | warm minus numpy s | peak RSS MB (warm) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for label, row in startup.items():
            cells = []
            for cache in ("empty", "warm"):
                r = row.get(cache)
                cells.append("" if r is None else f"error: {r['error']}" if "error" in r else f"{r['wall_s']:.2f}")
            if "kernels_ready_s" in row:
                ready = row["kernels_ready_s"]
                cells[1] = f"(kernels ready after {ready:.1f} s)" if ready is not None else "(kernels not ready after 300 s)"
            warm = row.get("warm", {})
            extra = f"{warm['wall_s'] - numpy_warm:+.2f}" if numpy_warm and "wall_s" in warm and "error" not in warm else ""
            rss = f"{warm['peak_rss_mb']:.0f}" if "peak_rss_mb" in warm else ""
            lines.append(f"| {label} | {cells[0]} | {cells[1]} | {extra} | {rss} |")
    if sizes:
        kinds = list(dict.fromkeys(kind for row in sizes.values() for kind in row if kind != "error"))
        lines += ["", "File sizes, MB:", "", "| model | " + " | ".join(kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
        for arch, row in sizes.items():
            cells = [f"{row[k]:.1f}" if k in row else row.get("error", "") for k in kinds]
            lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in results if "error" not in r]
    cases = sorted({(r["arch"], r["batch"]) for r in ok})
    runners = list(dict.fromkeys(r["runner"] for r in ok))
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.5), squeeze=False)
    for ax, (arch, batch) in zip(axes[0], cases):
        values = [next((r["images_per_s"] for r in ok if (r["arch"], r["batch"], r["runner"]) == (arch, batch, n)), 0) for n in runners]
        ax.bar(runners, values, color=["C%d" % i for i in range(len(runners))])
        ax.set_title(f"{arch}, batch {batch}")
        ax.set_ylabel("images/s (higher is better)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 batch 1, 3 repeats: a development check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--archs", nargs="+", default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--runners", nargs="+", default=None, help="default: every one available here")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--name", default=None, help="results file name (default: 'latest', or 'quick')")
    parser.add_argument("--no-startup", action="store_true", help="skip the fresh-process startup measurement")
    parser.add_argument("--worker", nargs=3, metavar=("RUNNER", "ARCH", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--onnx", default="", help=argparse.SUPPRESS)
    parser.add_argument("--startup-worker", metavar="WEIGHTS", help=argparse.SUPPRESS)
    parser.add_argument("--startup-backend", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--startup-photo", default=str(STARTUP_PHOTO), help=argparse.SUPPRESS)
    parser.add_argument("--reference-worker", nargs=3, metavar=("ARCH", "BATCH", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--reference", default="", help=argparse.SUPPRESS)
    parser.add_argument("--sizes-worker", nargs=2, metavar=("ARCH", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--no-sizes", action="store_true", help="skip the file sizes (.npz float32/float16, .onnx)")
    args = parser.parse_args(argv)
    args.warmup = warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.repeats = repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)

    if args.worker:
        runner, arch, batch = args.worker
        worker(runner, arch, int(batch), args.threads, warmup, args.onnx, args.reference)
        return 0
    if args.reference_worker:
        arch, batch, path = args.reference_worker
        print(json.dumps(reference_worker(arch, int(batch), int8_paths(os.path.dirname(path), arch)[0], path)))
        return 0
    if args.sizes_worker:
        print(json.dumps(sizes_worker(*args.sizes_worker)))
        return 0
    if args.startup_worker:
        print(json.dumps(startup_worker(args.startup_worker, args.startup_backend, args.threads, args.startup_photo)))
        return 0

    archs = args.archs or (["resnet18"] if args.quick else ["resnet18", "resnet50"])
    batches = args.batches or ([1] if args.quick else [1, 8])
    runners = args.runners or available_runners()
    name = args.name or ("quick" if args.quick else "latest")
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "threads": args.threads,
        "warmup": warmup,
        "repeats": repeats,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average": os.getloadavg(),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        exported = {}
        quantized = {}
        for arch in archs:
            if "onnxruntime" in runners:
                exported[arch] = export_onnx(arch, os.path.join(tmp, f"{arch}.onnx"), args.threads)
            if "numpy-int8" in runners or "onnxruntime-int8" in runners:
                quantized[arch] = quantize_files(arch, tmp, args.threads)
        references = {}
        for arch in archs:
            for batch in batches:
                path = references[arch, batch] = os.path.join(tmp, f"reference-{arch}-{batch}.npz")
                made = _run_json(["--reference-worker", arch, str(batch), path], args.threads)
                if "error" in made:
                    raise SystemExit(f"bench: the NumPy backend's reference logits failed: {made['error']}")
        results = []
        for arch in archs:
            for batch in batches:
                case_runners = []
                for runner in runners:
                    failed = exported.get(arch, {}) if runner == "onnxruntime" else quantized.get(arch, {}) if runner.endswith("-int8") else {}
                    if "error" in failed:
                        results.append({"runner": runner, "arch": arch, "batch": batch, **failed})
                    else:
                        case_runners.append(runner)
                results += time_case(arch, batch, case_runners, args, tmp, references[arch, batch])
        order = {r: i for i, r in enumerate(runners)}
        results.sort(key=lambda r: (archs.index(r["arch"]), batches.index(r["batch"]), order[r["runner"]]))
        startup = {} if args.no_startup else measure_startup(startup_runners(runners), args.threads, tmp)
        sizes = {} if args.no_sizes else file_sizes(archs, tmp, args.threads)
        for arch in sizes:
            for kind, path in zip(("npz int8", "onnx int8 (QDQ)"), int8_paths(tmp, arch)):
                if os.path.exists(path):
                    sizes[arch][kind] = os.path.getsize(path) / 1e6
    meta["load_average_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results, "startup": startup, "file_sizes_mb": sizes}, indent=1) + "\n")
    table = markdown(results, startup, meta, sizes)
    (RESULTS / f"{name}.md").write_text(table)
    chart(results, RESULTS / f"{name}.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
