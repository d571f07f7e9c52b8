"""bench/run.py checks each runner's logits against the reference before timing it, and names the runner when they are off."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).resolve().parent.parent / "bench" / "run.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture
def reference(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "reference.npz"
    np.savez(path, float=rng.standard_normal((2, 10)).astype(np.float32), int8=rng.standard_normal((2, 10)).astype(np.float32))
    with np.load(path) as arrays:
        return str(path), {k: arrays[k] for k in arrays.files}


def test_logits_within_float32_tolerance_pass(reference):
    path, logits = reference
    scale = np.abs(logits["float"]).max()
    bench.check_output("numba", logits["float"] + 0.5 * bench.FLOAT32_TOLERANCE * scale, path)
    bench.check_output("onnxruntime-int8", logits["int8"], path)  # int8 runners: against the int8 network


@pytest.mark.parametrize("runner, error", [("torch", 1e-3), ("numba", float("nan")), ("onnxruntime-int8", 0.1)])
def test_logits_off_the_reference_stop_the_bench_naming_the_runner(reference, runner, error):
    path, logits = reference
    want = logits["int8" if runner.endswith("-int8") else "float"]
    got = want.copy()
    got[1, 3] += error * np.abs(want).max()
    with pytest.raises(SystemExit, match=f"runner '{runner}' is off"):
        bench.check_output(runner, got, path)
