"""backend="auto": one rule (backends.choose_backend) for the Python API and the CLI, fed measured costs.

Each case feeds the rule a cost table and says which backend must finish the job first: the
expected answers are worked out here from the costs (start-up + compile when the cache is
empty + images x time per image), not read back from the code.
"""
import argparse

import pytest

from npresnet import backends, cli
from npresnet.backends import NUMPY_SECONDS_PER_GMAC, BackendCosts, choose_backend
from npresnet.model import ResNet
from npresnet.specs import count_macs, get_spec

# numba: 2 s to start, 6 s more to compile; on basic blocks 0.9x NumPy's time per image at batch 1 and
# half from batch 8 on; on bottlenecks 1.1x at batch 1 (slower than NumPy), 0.6x from batch 8 on.
COSTS = {
    "numpy": BackendCosts(startup_s=0.0, compile_s=0.0, per_image={}),
    "numba": BackendCosts(startup_s=2.0, compile_s=6.0, per_image={"basic": (0.9, 0.5), "bottleneck": (1.1, 0.6)}),
}
SPEC = get_spec("resnet18")
NUMPY_S = count_macs(SPEC) / 1e9 * NUMPY_SECONDS_PER_GMAC  # NumPy's seconds per image for resnet18


def pick(num_images, batch_size=8, cached=True, available=("numpy", "numba"), spec=SPEC, build="wait"):
    return choose_backend(spec, num_images, batch_size, costs=COSTS, cached={"numba": cached}, available=list(available),
                          build=build)


def test_short_jobs_run_on_numpy_and_long_ones_where_they_finish_first():
    numpy_s = NUMPY_S
    # Warm cache at batch 8: numba wins once the 2 s start-up is repaid by 0.5 x numpy_s per image.
    break_even = 2.0 / (0.5 * numpy_s)
    assert pick(int(break_even) - 1) == "numpy"
    assert pick(int(break_even) + 2) == "numba"
    # An empty cache adds the compile: the same job that paid for numba's start-up now runs on NumPy.
    assert pick(int(break_even) + 2, cached=False) == "numpy"
    assert pick(int((2.0 + 6.0) / (0.5 * numpy_s)) + 2, cached=False) == "numba"
    assert pick(1) == "numpy"


def test_an_empty_cache_built_in_the_background_costs_numpys_speed_while_it_builds():
    """Build mode background: for the compile's 6 s the images run on NumPy, then at 0.5x. Numba then
    wins once 2 s + 6 s + 0.5 x (rest) < all on NumPy, i.e. from 10 s of NumPy's work, not from the
    16 s that waiting for the compile needs."""
    images = int(13.0 / NUMPY_S)
    assert pick(images, cached=False, build="background") == "numba"
    assert pick(images, cached=False, build="wait") == "numpy"
    assert pick(int(9.0 / NUMPY_S), cached=False, build="background") == "numpy"
    assert pick(int(11.0 / NUMPY_S), cached=False, build="background") == "numba"
    # A short job: all on NumPy either way, plus numba's start-up: NumPy.
    assert pick(int(5.0 / NUMPY_S), cached=False, build="background") == "numpy"


def test_the_build_mode_comes_from_the_environment(monkeypatch):
    images = int(13.0 / NUMPY_S)
    monkeypatch.setenv("NPRESNET_KERNEL_BUILD", "background")
    assert choose_backend(SPEC, images, 8, costs=COSTS, cached={"numba": False}, available=["numpy", "numba"]) == "numba"
    monkeypatch.setenv("NPRESNET_KERNEL_BUILD", "wait")
    assert choose_backend(SPEC, images, 8, costs=COSTS, cached={"numba": False}, available=["numpy", "numba"]) == "numpy"


def test_per_image_cost_follows_the_batch_size_and_the_block():
    images = int(2.0 / (0.5 * NUMPY_S)) + 2  # enough at batch 8, too few at batch 1 (0.9 x)
    assert pick(images, batch_size=8) == "numba"
    assert pick(images, batch_size=1) == "numpy"
    # A job with no end (the Python API's model): only the time per image counts, which for
    # bottlenecks at batch 1 is NumPy's, and for basic blocks numba's.
    resnet50 = get_spec("resnet50")
    assert pick(None, batch_size=1, spec=resnet50) == "numpy"
    assert pick(None, batch_size=8, spec=resnet50) == "numba"
    assert pick(None, batch_size=1) == "numba"
    assert pick(None, batch_size=1, spec=None) == "numpy"  # architecture unknown: the worst block's costs


def test_a_backend_that_cannot_run_here_is_never_chosen():
    assert pick(10**6, available=["numpy"]) == "numpy"


def test_kernels_cached_reads_the_objects_built_from_the_current_kernel_source(tmp_path, monkeypatch):
    """Warm only when every kernel has an object built from the kernels' current source (on any CPU);
    objects of another source (an older npresnet) do not count."""
    pytest.importorskip("npresnet_kernels.cpu")
    from npresnet_kernels import aot

    module = backends._KERNEL_MODULES["numba"]
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("NPRESNET_HOME", str(tmp_path))
    assert backends.kernel_cache_dir() == str(tmp_path / "numba")
    assert not backends.kernels_cached("numba")
    names = sorted(aot.declared_kernels(module))
    assert {"gemm_packed", "conv_packed", "winograd_input", "winograd_output", "max_pool_3x3s2"} <= set(names)
    stale = tmp_path / "numba" / "aot" / "0123456789abcdef" / "cpu"
    current = tmp_path / "numba" / "aot" / aot.source_key(module) / "othercpu"
    stale.mkdir(parents=True)
    current.mkdir(parents=True)
    for name in names:
        (stale / f"cpu_kernels.{name}.000000000000.o").write_bytes(b"")
    assert not backends.kernels_cached("numba")
    for name in names:
        (current / f"cpu_kernels.{name}.000000000000.o").write_bytes(b"")
        assert backends.kernels_cached("numba") == (name == names[-1])  # one missing kernel: cold
    assert not backends.kernels_cached("numpy")  # no kernels to cache


def test_the_source_key_changes_with_the_kernel_source(tmp_path, monkeypatch):
    pytest.importorskip("npresnet_kernels.cpu")
    from npresnet_kernels import aot

    source = tmp_path / "kernels_copy.py"
    source.write_text("@kernel(nogil=True)\ndef a(x):\n    pass\n")
    monkeypatch.setattr(aot, "_module_file", lambda module: str(source))
    aot.source_key.cache_clear()
    aot.declared_kernels.cache_clear()
    try:
        before = aot.source_key("m")
        assert aot.declared_kernels("m") == {"a"}
        source.write_text("@kernel(nogil=True)\ndef a(x):\n    x[0] = 1\n")
        aot.source_key.cache_clear()
        assert aot.source_key("m") != before
    finally:
        aot.source_key.cache_clear()
        aot.declared_kernels.cache_clear()


@pytest.mark.parametrize("table", ["numba_cheap", "numba_dear"])
def test_cli_and_python_api_follow_the_same_rule_and_table(monkeypatch, table):
    """Both read backends.AUTO_COSTS through choose_backend: change the table and both change their pick."""
    numba = {
        "numba_cheap": BackendCosts(startup_s=0.0, compile_s=0.0, per_image={"basic": (0.1, 0.1)}),
        "numba_dear": BackendCosts(startup_s=30.0, compile_s=60.0, per_image={"basic": (2.0, 2.0)}),
    }[table]
    monkeypatch.setattr(backends, "AUTO_COSTS", {"numpy": COSTS["numpy"], "numba": numba})
    monkeypatch.setattr(backends, "_importable", lambda name: True)
    expected = "numba" if table == "numba_cheap" else "numpy"
    model = ResNet(get_spec("resnet18").replace(num_classes=3), backend="numpy")
    assert cli.backend_for(model, 5, 16, (224, 224)) == expected
    assert choose_backend(model.spec, None, 1) == expected  # what ResNet(backend="auto") asks
    if table == "numba_dear":  # no numba import needed to check the API's backend object
        assert backends.get_backend("auto", spec=model.spec).name == "numpy"
        assert ResNet(model.spec, backend="auto").backend.name == "numpy"
        args = argparse.Namespace(backend="auto", threads=None, weights=None, arch="resnet18", batch_size=4, resize=(32, 32))
        assert cli.model_from_args(args, num_images=3).backend.name == "numpy"
