"""tests/cuda: the CUDA backend's kernels, on a GPU or under numba's CUDA simulator.

Run ``python -m pytest tests/cuda`` where an NVIDIA GPU is visible, or
``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda`` anywhere (the main suite does the latter
through tests/test_cuda.py, in a process of its own, since the variable must be set before numba
is imported).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    # The simulator runs each CUDA thread as a Python thread and polls them from another, so a kernel
    # launch is mostly GIL hand-offs: handing over every 1 ms instead of Python's 5 ms runs these tests
    # about a fifth faster (numba/cuda/simulator/kernel.py, BlockManager.run).
    sys.setswitchinterval(0.001)


def pytest_collection_modifyitems(config, items):
    try:
        from numba import cuda
    except ImportError:
        return  # the test modules skip themselves
    if not cuda.is_available():
        raise pytest.UsageError("tests/cuda need an NVIDIA GPU, or NUMBA_ENABLE_CUDASIM=1 for numba's simulator")
