"""What the whole suite shares: one thread per math library, and the CUDA simulator's run on the other core.

This file is read before any test module, hence before numpy or torch is imported; the processes the
tests start inherit the same environment.
"""
import os

# One thread for the BLAS and OpenMP pools numpy and torch start (an explicit setting wins). The tests'
# arrays are small, so a second thread mostly waits for the first: torch's float64 grouped convolutions
# ran 5x slower with two on a busy machine. The second core runs tests/cuda meanwhile (below).
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")


def pytest_collection_finish(session):
    """Start tests/cuda under the simulator (tests/test_cuda.py) now, in a process of its own, when its
    test is among those selected: a minute of one core that the rest of the suite does not use."""
    for item in session.items:
        start = getattr(item.module, "start_simulator_run", None)
        if start is not None and item.name == "test_cuda_kernels_pass_under_the_simulator":
            start()
            return


def pytest_sessionfinish(session):
    for item in session.items:
        stop = getattr(item.module, "stop_simulator_run", None)
        if stop is not None:
            stop()
            return
