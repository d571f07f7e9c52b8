"""The one comparison helper every test uses, and the one way tests start a Python process."""
import os
import subprocess
import sys
import textwrap

import numpy as np


def max_rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference relative to the largest magnitude of `expected`."""
    scale = max(float(np.max(np.abs(expected))), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))) / scale


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
