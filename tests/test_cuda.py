"""The CUDA backend from the main suite: tests/cuda under numba's simulator, and its absence without a GPU.

numba reads NUMBA_ENABLE_CUDASIM when it is first imported, and this process has imported it
already for the CPU backend, so both run in a fresh interpreter.
"""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("numba.cuda", reason="needs numba-cuda: pip install 'npresnet[cuda]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code_or_args, simulator: bool):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_cuda_kernels_pass_under_the_simulator():
    result = python(["-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join("tests", "cuda")], simulator=True)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr
    assert result.returncode == 0, f"tests/cuda failed under the simulator:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, f"no test ran: {summary}"
    assert "failed" not in summary and "error" not in summary, summary


PROBE = """
from numba import cuda
if cuda.is_available():
    print("GPU")
else:
    import npresnet
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
    if result.stdout.strip() == "GPU":
        pytest.skip("an NVIDIA GPU is visible: the backend is available here")
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert lines["auto"] != "cuda"
    assert "cuda" not in lines["available"].split(",")
    assert "backend 'cuda' is not available" in lines["unavailable"]
    assert "NVIDIA GPU" in lines["unavailable"] and "NUMBA_ENABLE_CUDASIM" in lines["unavailable"]
