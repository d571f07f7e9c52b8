"""A fuzz harness for npresnet's readers: every weights file and image either loads or fails cleanly.

Cases (``fuzz/cases.py``) are real files of every format, their random mutations, and crafted
hostile files of each class in issue 10. ``run_cases`` writes them to a folder and loads them in
child processes (``fuzz/child.py``), many to a child, each child under an address-space limit
(RLIMIT_AS) and each case under a time limit. A case passes when it loads or raises the promised
error (WeightsError for weights, ImageError for images) naming the file; a crash, a hang, a
MemoryError or any other exception fails it.

Bounds (issue 10's targets, with room for a busy machine in the time limit):
* time: 2 s per MB of file + 1 s, times ``time_factor`` (default 5) of wall time before a case is
  called a hang; each case's CPU time is reported against the bound itself (``summary``);
* memory: the child may grow by 4 x the largest file of its batch + 128 MiB (weights: the
  readers' own cap is 4 x the file + 64 MiB), 8 x + 256 MiB for images, whose decoders
  allocate the declared pixels (up to 64 MiB, or 1024 x the file) before decoding.

    python -m fuzz --cases 5000 --seed 1          # the long run; tests/test_fuzz.py runs a fixed short set
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .cases import IMAGE, Case

PASSING = {"loaded", "read", "WeightsError", "ImageError"}
BATCH = 64
STARTUP_S = 60  # importing numpy, Pillow and npresnet on a busy machine
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    case: Case
    outcome: str
    message: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.outcome in PASSING


def time_bound(case: Case) -> float:
    return 2.0 * len(case.data) / 1e6 + 1.0


def allowance(case: Case) -> int:
    if case.kind == IMAGE:
        return 8 * len(case.data) + (256 << 20)
    return 4 * len(case.data) + (128 << 20)


@dataclass
class _Batch:
    cases: list[Case]
    paths: dict[str, str] = field(default_factory=dict)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread and one malloc arena: the address-space limit then measures the case, not thread reservations.
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_ARENA_MAX="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.pop("NPRESNET_MAX_LOAD_BYTES", None)
    return env


def _run_batch(cases: list[Case], folder: Path, time_factor: float) -> list[Result]:
    """Load `cases` in one child; after a crash or hang, the rest go to a new child."""
    results: list[Result] = []
    pending = list(cases)
    while pending:
        spec = [{"id": str(i), "kind": case.kind, "path": str(folder / f"{case.family}-{case.name}{case.suffix}")}
                for i, case in enumerate(pending)]
        for entry, case in zip(spec, pending):
            Path(entry["path"]).write_bytes(case.data)
        spec_path = folder / "cases.json"
        spec_path.write_text(json.dumps(spec))
        budget = max(allowance(case) for case in pending)
        child = subprocess.Popen([sys.executable, "-m", "fuzz.child", str(spec_path), str(budget)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env())
        done: dict[int, Result] = {}
        current, deadline = None, time.monotonic() + STARTUP_S
        selector = selectors.DefaultSelector()
        selector.register(child.stdout, selectors.EVENT_READ)
        buffer = b""
        hung = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                hung = True
                child.kill()
                break
            if not selector.select(timeout=min(remaining, 1.0)):
                if child.poll() is not None:
                    break
                continue
            chunk = os.read(child.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                event = json.loads(line)
                index = int(event["id"])
                if event["event"] == "start":
                    current = index
                    deadline = time.monotonic() + time_factor * time_bound(pending[index])
                else:
                    done[index] = Result(pending[index], event["outcome"], event["message"], event["seconds"])
                    current = None
        child.wait()
        stderr = child.stderr.read().decode(errors="replace")[-300:]
        selector.close()
        child.stdout.close()
        child.stderr.close()
        results.extend(done[i] for i in sorted(done))
        if current is not None and current not in done:
            what = "timeout" if hung else f"crash (exit {child.returncode}: {stderr.strip()[-200:]})"
            results.append(Result(pending[current], what, "", time_factor * time_bound(pending[current]) if hung else 0.0))
            pending = pending[current + 1 :]
        elif len(done) < len(pending):
            if not done and current is None:  # the child died before its first case: not any case's fault
                raise RuntimeError(f"the fuzz child failed to start (exit {child.returncode}): {stderr}")
            pending = pending[len(done):]
        else:
            pending = []
    return results


def run_cases(cases: list[Case], time_factor: float = 5.0, batch: int = BATCH, workers: int = 1) -> list[Result]:
    """Every case's outcome, in the order of `cases`. Files over 4 MB go to a child of their own; the rest in
    batches of `batch`; `workers` children at a time (each one's bounds are its own, whatever runs beside it)."""
    large = [case for case in cases if len(case.data) > 4_000_000]
    small = [case for case in cases if len(case.data) <= 4_000_000]
    groups = [small[i : i + batch] for i in range(0, len(small), batch)] + [[case] for case in large]
    with tempfile.TemporaryDirectory(prefix="npresnet-fuzz-") as tmp:

        def run_group(numbered: tuple[int, list[Case]]) -> list[Result]:
            folder = Path(tmp) / str(numbered[0])
            folder.mkdir()
            results = _run_batch(numbered[1], folder, time_factor)
            shutil.rmtree(folder)
            return results

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # threads wait; the children work
            by_group = list(pool.map(run_group, enumerate(groups)))
    order = {id(case): i for i, case in enumerate(cases)}
    return sorted((r for results in by_group for r in results), key=lambda r: order[id(r.case)])


def summary(results: list[Result]) -> str:
    """Per family: cases tried and outcomes; then the failures, and the slowest case against its time bound."""
    by_family: dict[str, Counter] = {}
    for r in results:
        by_family.setdefault(r.case.family, Counter())[r.outcome] += 1
    lines = [f"{'family':<22} {'cases':>6}  outcomes"]
    for family in sorted(by_family):
        counts = by_family[family]
        lines.append(f"{family:<22} {sum(counts.values()):>6}  " + ", ".join(f"{k}: {v}" for k, v in counts.most_common()))
    failures = [r for r in results if not r.passed]
    lines.append(f"total {len(results)} cases, {len(failures)} failures")
    for r in failures[:50]:
        lines.append(f"  FAIL {r.case.family}/{r.case.name} ({len(r.case.data)} bytes): {r.outcome} {r.message[:200]}")
    if results:
        worst = max(results, key=lambda r: r.seconds / time_bound(r.case))
        lines.append(f"slowest against its bound: {worst.case.family}/{worst.case.name}: {worst.seconds:.2f} CPU s "
                     f"of {time_bound(worst.case):.2f} s allowed ({len(worst.case.data)} bytes)")
    return "\n".join(lines)
