"""Runners that take turns: how bench/run.py and bench/train_step.py time peers side by side.

This machine's speed drifts by 20-40% over minutes, so runners timed one after the other measured the
drift as much as themselves. Instead each runner lives in a worker process of its own (so that its peak
resident memory is its own), all alive at once, and the benchmark asks each in turn for one timing:
every median then covers the same minutes.

The protocol: the worker says one JSON line when it is ready, then answers each request line on its
stdin with one JSON line (serve), and a last line with its peak memory when the requests end.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "NPRESNET_NUM_THREADS")


def pinned_env(threads: int) -> dict:
    """This environment with every library's thread count pinned, and the checkout's npresnet first on the path."""
    env = dict(os.environ)
    for var in THREAD_VARIABLES:
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["NPRESNET_KERNEL_BUILD"] = "wait"  # timed calls run the kernels, never the NumPy stand-in of a kernel being built
    return env


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


# --- the worker's side --------------------------------------------------------------------------------


def say(reply: dict) -> None:
    print(json.dumps(reply), flush=True)


def serve(request: str, answer) -> None:
    """answer() for each `request` line on stdin; at any other line (or its end), the peak memory, last."""
    for line in sys.stdin:
        if line.strip() != request:
            break
        say(answer())
    say({"peak_rss_mb": peak_rss_mb()})


# --- the benchmark's side -----------------------------------------------------------------------------


class Worker:
    """`python script *args` as a worker (see serve), its first reply in `ready` ({"error": ...} if it
    ended first). Its stderr goes to a file (a pipe nobody reads could fill and block it); the last line
    of it is the error when the worker ends early."""

    def __init__(self, script: str, args: list[str], threads: int):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, str(script), *args], env=pinned_env(threads), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        self.ready = self.reply()

    def reply(self) -> dict:
        out = self.proc.stdout.readline()
        if out:
            return json.loads(out)
        self.proc.wait()
        self.stderr.seek(0)
        lines = self.stderr.read().strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {self.proc.returncode}"}

    def ask(self, request: str) -> dict:
        try:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # it has ended: reply() says why
            pass
        return self.reply()

    def close(self) -> dict:
        """Ends the worker: its last reply (the peak memory)."""
        last = self.ask("done")
        self.proc.wait(timeout=60)
        self.stderr.close()
        return last

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
