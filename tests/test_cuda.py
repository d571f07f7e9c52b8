"""The CUDA backend from the main suite: tests/cuda under numba's simulator, and its absence without a GPU.

numba reads NUMBA_ENABLE_CUDASIM when it is first imported, and this process has imported it
already for the CPU backend, so both run in a fresh interpreter.
"""
import functools
import os
import re

import pytest

from helpers import Background, run_python

pytest.importorskip("numba.cuda", reason="needs numba-cuda: pip install 'npresnet[cuda]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code_or_args, simulator: bool):
    return run_python(code_or_args, env={"NUMBA_ENABLE_CUDASIM": "1" if simulator else None}, cwd=ROOT, timeout=900)


# tests/cuda under the simulator: a minute of one core, started with the session (tests/conftest.py).
BACKGROUND = {
    "simulator_run": Background(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join("tests", "cuda")], env={"NUMBA_ENABLE_CUDASIM": "1"}
    )
}


@pytest.fixture
def simulator_run():
    return BACKGROUND["simulator_run"].wait(timeout=900)


def test_cuda_kernels_pass_under_the_simulator(simulator_run):
    result = simulator_run
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr
    assert result.returncode == 0, f"tests/cuda failed under the simulator:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, f"no test ran: {summary}"
    assert "failed" not in summary and "error" not in summary, summary


PROBE = """
from numba import cuda
import npresnet
if cuda.is_available():
    print("gpu: yes")
    print("cuda backend:", npresnet.get_backend("cuda").name)
else:
    print("gpu: no")
    print("auto:", npresnet.get_backend("auto").name)
    print("available:", ",".join(npresnet.available_backends()))
    try:
        npresnet.resnet18(backend="cuda")
    except npresnet.BackendUnavailable as exc:
        print("unavailable:", exc)
"""


def test_cuda_backend_without_gpu_is_unavailable_and_never_auto():
    result = python(PROBE, simulator=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    if lines["gpu"] == "yes":  # on a GPU machine the same test checks the other side: cuda is there
        assert lines["cuda backend"] == "cuda"
        return
    assert lines["auto"] != "cuda"
    assert "cuda" not in lines["available"].split(",")
    assert "backend 'cuda' is not available" in lines["unavailable"]
    assert "NVIDIA GPU" in lines["unavailable"] and "NUMBA_ENABLE_CUDASIM" in lines["unavailable"]


COMPILE = """
import re
import numpy as np
from numba import cuda, types
import npresnet_kernels.cuda as kc
for dtype in (np.float32, np.float64):
    real = types.float32 if dtype == np.float32 else types.float64
    a1, a2, a3, a4 = (types.Array(real, d, "C") for d in (1, 2, 3, 4))
    i = types.int64
    ptxs = {f"tiled-{name}": cuda.compile_ptx(kc.conv2d_tiled_kernel(np.dtype(dtype), t).py_func,
                                             (a4, a3, a1, a4, a4, i, i, i, i, i, i), cc=(8, 0))[0]
            for name, t in kc.TILINGS.items()}
    ptxs["naive"] = cuda.compile_ptx(kc.conv2d_naive_kernel.py_func, (a4, a4, a1, a4, a4, i, i, i, i), cc=(8, 0))[0]
    ptxs["max_pool"] = cuda.compile_ptx(kc.max_pool_kernel.py_func, (a4, a4, i, i, i), cc=(8, 0))[0]
    ptxs["avg_pool"] = cuda.compile_ptx(kc.global_avg_pool_kernel(np.dtype(dtype)).py_func, (a4, a2), cc=(8, 0))[0]
    for name, ptx in ptxs.items():
        # ".f64" as an instruction type; registers may be named %f64.
        print(dtype.__name__, name, bool(re.search(r"[.]f64\\b", ptx)), ".local" in ptx)
"""


# Where CI installs NVIDIA's compiler wheels it sets this, so that the test below runs (and fails if the
# compiler does not work) instead of being skipped.
REQUIRE_PTX = os.environ.get("NPRESNET_REQUIRE_PTX") == "1"
# A kernel as small as can be that still needs what the real ones need: NVVM, and max() (whose
# typing asks for a device's compute capability where numba's compiler is incompletely installed).
PTX_PROBE = """
from numba import cuda, types
def probe(a):
    i = cuda.grid(1)
    if i < a.shape[0]:
        a[i] = max(a[i], 0)
cuda.compile_ptx(probe, (types.float32[:],), cc=(8, 0))
"""


@functools.lru_cache(maxsize=None)
def ptx_compiler_works() -> bool:
    """Whether numba.cuda compiles a tiny kernel to PTX here, tried in a fresh process (simulator off).

    Trying is the only reliable sign: a machine can have an `nvcc` on PATH whose toolkit lacks what
    numba needs (NVVM, NVRTC), and NVIDIA's wheels (nvidia-nvvm, nvidia-cuda-nvrtc) need no nvcc at all.
    """
    return python(PTX_PROBE, simulator=False).returncode == 0


@pytest.mark.skipif(
    not REQUIRE_PTX and not ptx_compiler_works(),
    reason="needs a working NVIDIA compiler for numba.cuda: pip install nvidia-nvvm nvidia-cuda-nvrtc (CI does)",
)
def test_kernels_compile_for_a_gpu_with_no_float64_in_float32():
    # Real numba.cuda compilation (not the simulator, which runs Python): every kernel types and
    # lowers to PTX, the float32 kernels do no float64 arithmetic (a stray literal would add it),
    # and the tiled kernel keeps its accumulators in registers (no local memory).
    result = python(COMPILE, simulator=False)
    assert result.returncode == 0, f"PTX compilation failed:\n{result.stderr[-3000:]}"
    rows = [line.split() for line in result.stdout.strip().splitlines()]
    assert len(rows) == 2 * (len(("square", "column", "flat")) + 3), result.stdout
    for dtype, name, has_f64, has_local in rows:
        # float64 kernels show that the search finds float64 instructions where there are some.
        assert has_f64 == str(dtype == "float64"), f"{dtype} kernel {name}: float64 instructions {has_f64}"
        if name.startswith("tiled"):
            assert has_local == "False", f"{dtype} {name} spills to local memory"
