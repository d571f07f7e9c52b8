"""backend="auto": one rule (backends.choose_backend) for the Python API and the CLI, fed measured costs.

Each case feeds the rule a cost table and says which backend must finish the job first: the
expected answers are worked out here from the costs (start-up + compile when the cache is
empty + images x time per image), not read back from the code.
"""
import argparse
import os
import time

import numpy as np
import pytest

from npresnet import backends, cli
from npresnet.backends import NUMPY_SECONDS_PER_GMAC, BackendCosts, choose_backend
from npresnet.model import ResNet
from npresnet.specs import count_macs, get_spec

# numba: 2 s to start, 6 s more to compile, half NumPy's time per image from batch 8 on, 0.9x at batch 1.
COSTS = {
    "numpy": BackendCosts(startup_s=0.0, compile_s=0.0, per_image_batch1=1.0, per_image_batched=1.0),
    "numba": BackendCosts(startup_s=2.0, compile_s=6.0, per_image_batch1=0.9, per_image_batched=0.5),
}
MACS = 2e9  # NumPy: 2 x NUMPY_SECONDS_PER_GMAC seconds per image


def pick(num_images, batch_size=8, cached=True, available=("numpy", "numba")):
    return choose_backend(MACS, num_images, batch_size, costs=COSTS, cached={"numba": cached}, available=list(available))


def test_short_jobs_run_on_numpy_and_long_ones_where_they_finish_first():
    numpy_s = 2 * NUMPY_SECONDS_PER_GMAC
    # Warm cache at batch 8: numba wins once the 2 s start-up is repaid by 0.5 x numpy_s per image.
    break_even = 2.0 / (0.5 * numpy_s)
    assert pick(int(break_even) - 1) == "numpy"
    assert pick(int(break_even) + 2) == "numba"
    # An empty cache adds the compile: the same job that paid for numba's start-up now runs on NumPy.
    assert pick(int(break_even) + 2, cached=False) == "numpy"
    assert pick(int((2.0 + 6.0) / (0.5 * numpy_s)) + 2, cached=False) == "numba"
    assert pick(1) == "numpy"


def test_per_image_cost_follows_the_batch_size():
    numpy_s = 2 * NUMPY_SECONDS_PER_GMAC
    images = int(2.0 / (0.5 * numpy_s)) + 2  # enough at batch 8, too few at batch 1 (0.9 x)
    assert pick(images, batch_size=8) == "numba"
    assert pick(images, batch_size=1) == "numpy"
    slower = {**COSTS, "numba": BackendCosts(0.5, 6.0, per_image_batch1=1.1, per_image_batched=0.5)}
    # A job with no end (the Python API's model): only the time per image counts.
    assert choose_backend(MACS, None, 1, costs=slower, cached={}, available=["numpy", "numba"]) == "numpy"
    assert choose_backend(MACS, None, 8, costs=slower, cached={}, available=["numpy", "numba"]) == "numba"


def test_a_backend_that_cannot_run_here_is_never_chosen():
    assert pick(10**6, available=["numpy"]) == "numpy"


def test_kernels_cached_reads_numba_index_files_newer_than_the_kernel_source(tmp_path, monkeypatch):
    """Warm only when every kernel has an index file, and only one written after the kernel source."""
    cpu = pytest.importorskip("npresnet_kernels.cpu")
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("NPRESNET_HOME", str(tmp_path))
    assert backends.kernel_cache_dir() == str(tmp_path / "numba")
    assert not backends.kernels_cached("numba")
    folder = tmp_path / "numba" / "kernels_0123"
    folder.mkdir(parents=True)
    names = sorted(cpu._KERNELS)
    assert len(names) >= 5
    after = os.path.getmtime(cpu.__file__) + 60
    for i, name in enumerate(names):
        index = folder / f"cpu.{name}-{100 + i}.py311.nbi"
        index.write_bytes(b"")
        os.utime(index, (time.time(), after))
        assert backends.kernels_cached("numba") == (name == names[-1])  # one missing kernel: cold
    os.utime(index, (time.time(), after - 120))  # written before the source changed: stale
    assert not backends.kernels_cached("numba")
    assert not backends.kernels_cached("numpy")  # no kernels to cache


@pytest.mark.parametrize("table", ["numba_cheap", "numba_dear"])
def test_cli_and_python_api_follow_the_same_rule_and_table(monkeypatch, table):
    """Both read backends.AUTO_COSTS through choose_backend: change the table and both change their pick."""
    numba = {
        "numba_cheap": BackendCosts(startup_s=0.0, compile_s=0.0, per_image_batch1=0.1, per_image_batched=0.1),
        "numba_dear": BackendCosts(startup_s=30.0, compile_s=60.0, per_image_batch1=2.0, per_image_batched=2.0),
    }[table]
    monkeypatch.setattr(backends, "AUTO_COSTS", {"numpy": COSTS["numpy"], "numba": numba})
    monkeypatch.setattr(backends, "_importable", lambda name: True)
    expected = "numba" if table == "numba_cheap" else "numpy"
    model = ResNet(get_spec("resnet18").replace(num_classes=3), backend="numpy")
    assert cli.backend_for(model, 5, 16, (224, 224)) == expected
    assert choose_backend(count_macs(model.spec), None, 1) == expected  # what get_backend("auto") asks
    if table == "numba_dear":  # no numba import needed to check the API's backend object
        assert backends.get_backend("auto").name == "numpy"
        args = argparse.Namespace(backend="auto", threads=None, weights=None, arch="resnet18", batch_size=4, resize=(32, 32))
        assert cli.model_from_args(args, num_images=3).backend.name == "numpy"
