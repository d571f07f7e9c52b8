"""What the whole suite shares: one thread per math library, and its slowest subprocesses on the other core.

This file is read before any test module, hence before numpy or torch is imported; the processes the
tests start inherit the same environment.
"""
import ctypes
import ctypes.util
import gc
import importlib.util
import os
import threading

import pytest

# One thread for the BLAS and OpenMP pools numpy and torch start (an explicit setting wins). The tests'
# arrays are small, so a second thread mostly waits for the first: torch's float64 grouped convolutions
# ran 5x slower with two on a busy machine. The second core runs the background subprocesses (below).
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")
# The Numba backend's kernels are built before they run, as bench/ has them: in a user's default ("background")
# a layer whose kernel is still being built runs on NumPy, and a test of the kernels would test NumPy.
# test_aot sets "background" where it tests that.
os.environ["NPRESNET_KERNEL_BUILD"] = "wait"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _runs_numba(item) -> bool:
    return "numba" in item.nodeid or item.module.__name__.startswith("test_kernels")


_STARTED = []  # the background runs started by pytest_collection_finish, stopped at the session's end
# Where this process's memory peaks (torch's and npresnet's copies of the widest networks, float64 training
# passes): a heavy background run starts after the last of their tests, so that the two peaks never meet.
HEAVY_MODULES = ("test_grad", "test_model")
_PAST_HEAVY = threading.Event()
_LAST_HEAVY = []  # the node id of the last test of HEAVY_MODULES in this session


def pytest_collection_modifyitems(session, config, items):
    """The modules whose fixtures wait for a background run go last (each kept whole, in its order), so that
    their runs have finished by then and this process never waits for them."""
    items.sort(key=lambda item: bool(getattr(item.module, "BACKGROUND", None)))


def pytest_collection_finish(session):
    """Start the slow subprocesses the selected tests' fixtures wait for (each module's BACKGROUND: fixture
    name -> helpers.Background): tests/cuda under the simulator, the digits fine-tuning, the digits model
    torch trains. One at a time, from a thread, so that they share the second core and this process
    keeps the first while it runs the tests before theirs.

    First of all, where tests run the Numba backend, tests/warm_kernels.py: the kernels compiled into the
    cache while this process runs other tests (in a fresh checkout, about 40 s of one core)."""
    runs = []
    if _has("numba") and any(_runs_numba(item) for item in session.items):
        from helpers import Background  # tests/ is on sys.path once a test module is collected

        runs.append(Background([os.path.join("tests", "warm_kernels.py")]))
    for item in session.items:
        for fixture, run in getattr(item.module, "BACKGROUND", {}).items():
            if fixture in item.fixturenames and run not in runs:
                runs.append(run)

    runs.sort(key=lambda run: run.heavy)  # stable: the heavy ones last, in their order
    heavy_items = [item.nodeid for item in session.items if item.module.__name__ in HEAVY_MODULES]
    if heavy_items:
        _LAST_HEAVY.append(heavy_items[-1])
    else:
        _PAST_HEAVY.set()

    def one_after_another():
        for run in runs:
            if run.heavy:
                _PAST_HEAVY.wait()
            run.start()
            if run.process is not None:  # None: stopped, the session over
                run.process.wait()

    if runs:
        _STARTED.extend(runs)
        threading.Thread(target=one_after_another, daemon=True).start()


def pytest_runtest_logfinish(nodeid, location):
    if _LAST_HEAVY and nodeid == _LAST_HEAVY[0]:
        _PAST_HEAVY.set()


def pytest_sessionfinish(session):
    _PAST_HEAVY.set()  # a heavy run still waiting: the stop below keeps it from starting
    for run in _STARTED:
        run.stop()
    for module in {item.module for item in getattr(session, "items", [])}:
        for run in getattr(module, "BACKGROUND", {}).values():
            run.stop()


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


LIBC = _libc()


@pytest.hookimpl(trylast=True)  # after pytest's own teardown has finalized the module's fixtures
def pytest_runtest_teardown(item, nextitem):
    """After a module's last test: drop what its caches hold (functools.lru_cache'd torch networks and
    outputs) and hand the freed memory back to the OS. glibc keeps freed blocks below its mmap threshold
    (which grows to 32 MB) in the heap, so without malloc_trim one module's large arrays stay in the
    process's memory under the next one's."""
    if nextitem is not None and nextitem.module is item.module:
        return
    for value in list(vars(item.module).values()):
        if hasattr(value, "cache_clear") and getattr(value, "__module__", None) == item.module.__name__:
            value.cache_clear()
    gc.collect()
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):  # glibc only
        LIBC.malloc_trim(0)


@pytest.fixture
def cli():
    """helpers.run_cli: the command called in this process, its exit status and output."""
    from helpers import run_cli

    return run_cli
