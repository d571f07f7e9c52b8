"""The one comparison helper every test uses, and the one way tests start a Python process (in the background too)."""
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def max_rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference relative to the largest magnitude of `expected`."""
    scale = max(float(np.max(np.abs(expected))), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))) / scale


REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


def assert_close(actual, expected, dtype=None, tol=None):
    """The one comparison: shape, then dtype, then values within the project's tolerance for the dtype."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    dtype = np.dtype(dtype or expected.dtype)
    assert actual.dtype == dtype, f"dtype {actual.dtype} != expected {dtype}"
    assert np.all(np.isfinite(actual)) == np.all(np.isfinite(expected)), "non-finite values differ"
    err = max_rel_error(actual, expected)
    limit = tol if tol is not None else TOLERANCE[dtype]
    assert err <= limit, f"max error {err:.3e} relative to max |expected| exceeds {limit:.0e}"
    return err


def python_command(args, env=None) -> tuple[list[str], dict]:
    """The argv and environment that run this Python on `args`: code for -c (a string, dedented) or
    arguments (["-m", "npresnet", ...]); env: variables to set on top of this process's, None as a value
    removing one."""
    environment = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    argv = ["-c", textwrap.dedent(args)] if isinstance(args, str) else [str(a) for a in args]
    return [sys.executable, *argv], environment


def run_python(args, *, env=None, cwd=None, timeout=300, **options) -> subprocess.CompletedProcess:
    """Run this Python on `args` (see python_command) and wait. Output is captured as text unless
    `options` redirect it (stdout=...)."""
    argv, environment = python_command(args, env)
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **options}
    return subprocess.run(argv, env=environment, cwd=cwd, text=True, timeout=timeout, **streams)


def start_python(args, *, env=None, cwd=None, **options) -> subprocess.Popen:
    """Start this Python on `args` (see python_command) without waiting: the caller waits, or kills it."""
    argv, environment = python_command(args, env)
    return subprocess.Popen(argv, env=environment, cwd=cwd, text=True, **options)



def run_cli(*args) -> SimpleNamespace:
    """The `npresnet` command called in this process, as the console script calls it: main(argv), with its
    exit status and output (returncode, stdout, stderr), and no traceback. A process of its own proves
    nothing more for most tests, and costs a second each; tests of what only a process shows (pipes,
    exit on a signal, import blocking) start one (run_python)."""
    from npresnet.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            status = exc.code
    result = SimpleNamespace(returncode=status, stdout=out.getvalue(), stderr=err.getvalue())
    assert "Traceback" not in result.stderr, result.stderr
    return result


class Background:
    """A slow Python subprocess that a fixture needs, started early so that it runs on the core the suite
    leaves idle (the suite runs one thread: tests/conftest.py). A test module maps the fixture's name to
    it in BACKGROUND; tests/conftest.py starts those the selected tests use one after another once they
    are known, and stops them at the session's end; the fixture waits for it (starting it if need be).

    args: as for run_python; with `folder`, a fresh temporary folder is appended to them (the output goes there).
    """

    def __init__(self, args, *, env=None, folder=False, heavy=False):
        # heavy: it holds a gigabyte, so tests/conftest.py starts it only once the suite's own memory peak
        # (HEAVY_MODULES) is behind it, not beside it.
        self.args, self.env, self.with_folder, self.heavy = list(args), env, folder, heavy
        self.process, self.folder, self.stopped = None, None, False
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock:  # the conftest's thread and the fixture may both start it
            if self.process is None and not self.stopped:
                self._start()

    def _start(self) -> None:
        self.streams = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        args = self.args
        if self.with_folder:
            self.folder = Path(tempfile.mkdtemp(prefix="npresnet-tests-"))
            args = [*args, self.folder]
        self.process = start_python(args, env=self.env, cwd=REPO, stdout=self.streams[0], stderr=self.streams[1])

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """Start it if nobody has, wait for it to end (killed after `timeout` seconds), its output."""
        self.start()
        if self.process is None:
            raise RuntimeError("this background run was stopped before it started")
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        for stream in self.streams:
            stream.seek(0)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, *(s.read() for s in self.streams))

    def stop(self) -> None:
        """Kill it if it still runs (its fixture was never used: the session stopped early); remove its folder."""
        with self.lock:
            self.stopped = True
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in self.streams:
            stream.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
