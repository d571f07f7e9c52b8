"""The Numba backend against the NumPy reference: each kernel on edge cases, then a whole model.

The chain: torch checks functional.py (test_functional.py); functional.py checks
every kernel here, in float32 and float64; torch checks the numba model on every
architecture beside the NumPy one (test_model.py), and the reference model checks it
at ImageNet size here. Also: thread selection, backend="auto", and that a machine
without numba gets NumPy with no error.
"""
import gc
import os
import threading
import time
import weakref

import numpy as np
import pytest

import npresnet
from helpers import assert_close, run_python
from npresnet import functional as F
from npresnet.backends import ConvBatchNorm, FoldedConv, get_backend
from npresnet.model import random_state_dict
from npresnet.specs import get_spec

DTYPES = [np.float32, np.float64]


@pytest.fixture(scope="module")
def cpu():
    pytest.importorskip("numba")
    from npresnet_kernels import cpu

    return cpu


def numba_backend(cpu, path):
    """A backend forced onto one convolution path: 'winograd4', 'winograd2' or 'gemm'."""
    backend = cpu.NumbaBackend(threads=2, winograd_tile={"winograd4": 4, "winograd2": 2, "gemm": 0}[path])
    backend.MIN_TILES = 1  # Winograd even on the tiny maps of a test
    return backend


def reference_conv(x, conv: FoldedConv, relu, residual):
    return F.conv2d_bias_act(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.groups, residual, relu)


# (N, C, H, W, K, kernel, stride, padding, groups)
CONV_CASES = {
    "3x3": (2, 8, 9, 7, 16, 3, 1, 1, 1),
    "3x3_odd_8x5": (1, 5, 8, 5, 3, 3, 1, 1, 1),
    "3x3_1x1input": (1, 4, 1, 1, 6, 3, 1, 1, 1),
    "3x3_2x3input": (3, 4, 2, 3, 4, 3, 1, 1, 1),
    "3x3_stride2": (2, 8, 9, 7, 16, 3, 2, 1, 1),
    "3x3_stride2_1x1input": (1, 4, 1, 1, 4, 3, 2, 1, 1),
    "3x3_groups4": (2, 8, 9, 7, 16, 3, 1, 1, 4),
    "3x3_groups4_stride2": (2, 8, 9, 7, 16, 3, 2, 1, 4),
    "3x3_depthwise": (1, 6, 5, 5, 6, 3, 1, 1, 6),
    "1x1": (2, 8, 5, 5, 12, 1, 1, 0, 1),
    "1x1_stride2_odd": (2, 8, 5, 7, 12, 1, 2, 0, 1),
    "1x1_1x1input": (1, 8, 1, 1, 3, 1, 1, 0, 1),
    "7x7_stem": (1, 3, 11, 13, 8, 7, 2, 3, 1),
    "7x7_stem_tiny": (2, 3, 2, 3, 4, 7, 2, 3, 1),
    "5x5_nopad": (1, 4, 6, 7, 4, 5, 1, 0, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("path", ["winograd4", "winograd2", "gemm"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_matches_reference(cpu, case, path, dtype):
    N, C, H, W, K, k, stride, padding, groups = CONV_CASES[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    conv = FoldedConv(
        rng.standard_normal((K, C // groups, k, k)).astype(dtype), rng.standard_normal(K).astype(dtype), stride, padding, groups
    )
    backend = numba_backend(cpu, path)
    prepared = backend.prepare_conv(conv)
    residual_shape = reference_conv(x, conv, False, None).shape
    for relu in (False, True):
        for residual in (None, rng.standard_normal(residual_shape).astype(dtype)):
            want = reference_conv(x, conv, relu, residual)
            r = None if residual is None else backend.from_numpy(residual)
            got = backend.to_numpy(backend.conv(backend.from_numpy(x), prepared, relu, r))
            assert_close(got, want)
            if relu:
                assert got.min() >= 0


@pytest.mark.parametrize("path", ["winograd4", "winograd2", "gemm"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_unfolded_batch_norm_matches_folded_reference(cpu, case, path):
    """A batch norm's scale applied after the sum (in U for Winograd) gives the folded convolution's
    outputs, and the prepared form gives back the very weights it was handed."""
    N, C, H, W, K, k, stride, padding, groups = CONV_CASES[case]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    weight = rng.standard_normal((K, C // groups, k, k)).astype(np.float32)
    conv = ConvBatchNorm(weight, rng.uniform(0.1, 4, K), rng.standard_normal(K), stride, padding, groups, np.dtype(np.float32))
    backend = numba_backend(cpu, path)
    prepared = backend.prepare_conv_bn(conv)
    folded = conv.folded()
    residual = rng.standard_normal(reference_conv(x, folded, False, None).shape).astype(np.float32)
    got = backend.conv(backend.from_numpy(x), prepared, relu=True, residual=backend.from_numpy(residual))
    assert_close(backend.to_numpy(got), reference_conv(x, folded, True, residual))
    back = backend.conv_weight(prepared)
    assert back.dtype == weight.dtype and back.shape == weight.shape and np.array_equal(back, weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("E, M, D, K", [(1, 13, 7, 40), (3, 6, 16, 16), (2, 49, 33, 8), (1, 1, 1, 1)], ids=str)
def test_gemm_packed_matches_matmul(cpu, E, M, D, K, dtype):
    """gemm_packed on its own: row blocks of 6 and their remainder, whole and partial panels, a batch of
    GEMMs, a sub-range of panels (one thread's share), with scale, bias, residual and ReLU, NaN kept by ReLU."""
    rng = np.random.default_rng(8)
    a = rng.standard_normal((E, M, D)).astype(dtype)
    a[0, 0, 0] = np.nan  # row 0 of out[0] must come out NaN in every column, ReLU or not
    w = rng.standard_normal((E, D, K)).astype(dtype)
    bias, residual = rng.standard_normal(K).astype(dtype), rng.standard_normal((E, M, K)).astype(dtype)
    scale = rng.uniform(0.5, 2, K).astype(dtype)
    Wp = cpu.pack_panels(w)
    NR = Wp.shape[3]
    assert NR == 2 * cpu.simd_bytes() // np.dtype(dtype).itemsize
    kernels = cpu.NumbaBackend(threads=1).kernels
    tile = np.empty((6, NR), dtype)
    for relu in (False, True):
        for has_residual in (False, True):
            want = np.matmul(a, w) * scale + bias + (residual if has_residual else 0)
            if relu:
                want = np.maximum(want, 0)
            out = np.full((E, M, K), 7, dtype)
            panels = Wp.shape[1]
            # Two shares of the panels, as two threads would run them.
            for lo, hi in ((0, panels // 2), (panels // 2, panels)):
                kernels.gemm_packed(a, Wp, scale, bias, residual if has_residual else out, has_residual, relu, lo, hi, tile, out)
            np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
            assert np.isnan(out[0, 0]).all()
            assert_close(np.nan_to_num(out), np.nan_to_num(want))


def test_kernels_at_the_other_vector_width(cpu):
    """$NPRESNET_SIMD_BYTES sets the kernels' vector width (aot.simd_bytes): the width this machine would
    not pick (32-byte AVX2 vectors where it has AVX-512, 64-byte ones, which LLVM splits, where it has
    not) builds its own objects, packs its own panels, and computes the same GEMM."""
    other = 96 - cpu.simd_bytes()
    proc = run_python(
        f"""
        import numpy as np
        from npresnet_kernels import aot, cpu
        assert aot.simd_bytes() == {other} and cpu.panel_width(np.float32) == 2 * {other} // 4
        rng = np.random.default_rng(3)
        for E, M, D, K in ((1, 13, 7, 40), (2, 49, 33, 64)):
            a, w = rng.standard_normal((E, M, D)).astype(np.float32), rng.standard_normal((E, D, K)).astype(np.float32)
            scale, bias = rng.uniform(0.5, 2, K).astype(np.float32), rng.standard_normal(K).astype(np.float32)
            Wp = cpu.pack_panels(w)
            out = np.empty((E, M, K), np.float32)
            tile = np.empty((6, Wp.shape[3]), np.float32)
            cpu.NumbaBackend(threads=1).kernels.gemm_packed(a, Wp, scale, bias, out, False, True, 0, Wp.shape[1], tile, out)
            want = np.maximum(np.matmul(a.astype(np.float64), w) * scale + bias, 0)
            assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max(), (E, M, D, K)
        print("ok")
        """,
        env={"NPRESNET_SIMD_BYTES": str(other), "NPRESNET_KERNEL_BUILD": "wait"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("keep", ["1", "0"], ids=["kept", "opted-out"])
def test_the_backend_keeps_freed_memory_for_the_next_pass(cpu, keep):
    """Creating a NumbaBackend sets glibc's malloc to keep freed arrays' memory (cpu.keep_freed_memory):
    three 30 MiB arrays freed stay resident for the next allocations; NPRESNET_KEEP_FREED_MEMORY=0 leaves
    glibc's default, which gives them back to the system (and the next pass faults them in again)."""
    proc = run_python(
        """
        import numpy as np
        from npresnet_kernels import cpu
        cpu.NumbaBackend(threads=1)
        def resident_mb():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2**20
        for _ in range(2):
            arrays = [np.ones(30 << 18, dtype=np.float32) for _ in range(3)]  # 30 MiB each
            before = resident_mb()
            del arrays
            print(cpu.keep_freed_memory(), round(before - resident_mb()))
        """,
        env={"NPRESNET_KEEP_FREED_MEMORY": keep},
    )
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.splitlines():  # each pass: whether malloc was set, MiB given back on freeing 90
        kept, given_back = line.split()
        if keep == "1":
            assert kept == "True" and int(given_back) < 10, proc.stdout
        else:
            assert kept == "False" and int(given_back) > 50, proc.stdout


def test_simd_bytes_override_is_checked(cpu, monkeypatch):
    monkeypatch.setenv("NPRESNET_SIMD_BYTES", "48")
    with pytest.raises(ValueError, match="NPRESNET_SIMD_BYTES must be 32 or 64"):
        cpu.simd_bytes.__wrapped__()
    monkeypatch.setenv("NPRESNET_SIMD_BYTES", "32")
    assert cpu.simd_bytes.__wrapped__() == 32


def test_winograd_is_used_where_it_should_be(cpu):
    conv = cpu.PreparedConv(FoldedConv(np.zeros((4, 4, 3, 3)), np.zeros(4), 1, 1, 1))
    backend = cpu.NumbaBackend(threads=1)
    assert backend._winograd_tile(conv, 1, 56, 56) == 4
    assert backend._winograd_tile(conv, 1, 1, 1) == 0  # too few tiles: the GEMM path
    grouped = cpu.PreparedConv(FoldedConv(np.zeros((4, 1, 3, 3)), np.zeros(4), 1, 1, 4))
    assert backend._winograd_tile(grouped, 8, 56, 56) == 0
    strided = cpu.PreparedConv(FoldedConv(np.zeros((4, 4, 3, 3)), np.zeros(4), 2, 1, 1))
    assert backend._winograd_tile(strided, 8, 56, 56) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_error_against_float64_reference(cpu, tile, dtype):
    """A ResNet-sized 3x3 convolution (64 channels, 56x56): the error the tests' tolerance must cover."""
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((1, 64, 56, 56)), 0)  # post-ReLU input, as inside a ResNet
    weight = rng.standard_normal((64, 64, 3, 3)) * np.sqrt(2 / (64 * 9))
    want = F.conv2d(x, weight, padding=1)  # float64
    conv = FoldedConv(weight.astype(dtype), np.zeros(64, dtype), 1, 1, 1)
    backend = numba_backend(cpu, f"winograd{tile}")
    got = backend.to_numpy(backend.conv(backend.from_numpy(x.astype(dtype)), backend.prepare_conv(conv), relu=False))
    assert got.dtype == dtype
    limit = {np.float32: 1e-5, np.float64: 1e-13}[dtype]  # an order below the whole-model tolerance
    assert_close(got, want.astype(dtype), tol=limit)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (1, 2, 1, 1), (1, 4, 2, 2), (2, 5, 8, 8), (1, 21, 7, 9), (2, 64, 6, 5)], ids=str)
def test_max_pool_matches_reference(cpu, shape, dtype):
    """Bit for bit (a max is exact): channels fewer than a vector's lanes, whole vectors and a remainder;
    NaN propagates as in the reference (and torch), -inf never beats a number."""
    x = np.random.default_rng(2).standard_normal(shape).astype(dtype)
    x.flat[0] = np.nan
    x.flat[len(x.flat) // 2 :: 13] = np.nan
    x.flat[1::11] = -np.inf
    backend = cpu.NumbaBackend(threads=2)
    got = backend.to_numpy(backend.max_pool(backend.from_numpy(x)))
    want = F.max_pool2d(x, 3, 2, 1)
    assert np.isnan(got).any()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_pool_and_linear_match_reference(cpu, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 3, 5)).astype(dtype)
    weight, bias = rng.standard_normal((4, 6)).astype(dtype), rng.standard_normal(4).astype(dtype)
    backend = cpu.NumbaBackend(threads=2)
    pooled = backend.global_avg_pool(backend.from_numpy(x))
    assert_close(backend.to_numpy(pooled), F.adaptive_avg_pool2d(x, 1).reshape(2, 6))
    logits = backend.to_numpy(backend.linear(pooled, backend.prepare_linear(weight, bias)))
    assert_close(logits, F.linear(F.adaptive_avg_pool2d(x, 1).reshape(2, 6), weight, bias))


def test_conv_rejects_wrong_channels(cpu):
    backend = cpu.NumbaBackend(threads=1)
    prepared = backend.prepare_conv(FoldedConv(np.zeros((4, 3, 3, 3)), np.zeros(4), 1, 1, 1))
    with pytest.raises(ValueError, match="channels"):
        backend.conv(backend.from_numpy(np.zeros((1, 5, 4, 4))), prepared, relu=True)


# --- whole models against the reference model -----------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_default_numba_model_at_imagenet_size(cpu, dtype):
    """The path choice the bench uses (F(4x4) on big maps, F(2x2) and GEMM on small ones), at 224x224."""
    state = random_state_dict(get_spec("resnet18"), seed=6, dtype=dtype)
    x = np.random.default_rng(7).standard_normal((1, 3, 224, 224)).astype(dtype)
    want = npresnet.resnet18(state, backend="numpy")(x)
    assert_close(npresnet.resnet18(state, backend="numba")(x), want)


def test_numba_model_holds_its_weights_once(cpu):
    """After a forward pass the model's own conv and fc weights are gone (the prepared ones are the only copy), yet
    state_dict() gives them bit for bit; the live arrays come back for training, and a weight changed in
    place through them (then invalidate), even one held across a forward pass, is what the next pass uses."""
    spec = get_spec("resnet18", num_classes=5)
    rng = np.random.default_rng(3)
    state = random_state_dict(spec, seed=3)
    for key in state:  # batch norms that are not the identity, so that folding shows
        if key.endswith(("running_mean", "bn1.bias", "bn2.bias", "downsample.1.bias")):
            state[key] = rng.standard_normal(state[key].shape).astype(np.float32)
        elif key.endswith(("running_var", "bn1.weight", "bn2.weight", "downsample.1.weight")):
            state[key] = rng.uniform(0.5, 2, state[key].shape).astype(np.float32)
    weights = [k for k, v in state.items() if v.ndim > 1]  # the convolutions' and the fc's
    model = npresnet.build(spec, state, backend="numba")
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    held = {k: weakref.ref(v) for k, v in model.parameters().items() if k in weights}
    assert all(ref() is not None for ref in held.values())
    assert_close(model(x), npresnet.build(spec, state, backend="numpy")(x))
    assert [k for k, ref in held.items() if ref() is not None] == []  # the model's copies are freed
    saved = model.state_dict()
    for key, value in state.items():
        assert saved[key].dtype == value.dtype and np.array_equal(saved[key], value), key
    live = model.parameters()
    assert all(np.array_equal(live[k], state[k]) for k in weights)
    live["conv1.weight"] *= 2
    model.invalidate()
    del live
    kept = model.parameters()["layer2.0.conv2.weight"]  # held by the caller across the next forward pass
    state["conv1.weight"] *= 2
    assert_close(model(x), npresnet.build(spec, state, backend="numpy")(x))
    kept *= -1
    model.invalidate()
    state["layer2.0.conv2.weight"] *= -1
    assert_close(model(x), npresnet.build(spec, state, backend="numpy")(x))
    assert np.array_equal(model.state_dict()["layer2.0.conv2.weight"], state["layer2.0.conv2.weight"])


# --- choosing the backend and its threads ---------------------------------------------------

def test_threads_argument_and_environment(cpu, monkeypatch):
    import numba

    monkeypatch.delenv("NPRESNET_NUM_THREADS", raising=False)
    assert get_backend("numba", threads=1).threads == 1
    assert get_backend("numba").threads == numba.config.NUMBA_NUM_THREADS
    monkeypatch.setenv("NPRESNET_NUM_THREADS", "1")
    backend = get_backend("numba")
    assert backend.threads == 1
    assert backend._helpers is None  # one thread: every layer runs whole on the calling thread
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5))
    assert np.array_equal(backend.to_numpy(backend.max_pool(backend.from_numpy(x))), F.max_pool2d(x, 3, 2, 1))
    # More threads than numba's pool holds is clamped, not an error deep inside numba.
    assert get_backend("numba", threads=10_000).threads == numba.config.NUMBA_NUM_THREADS
    with pytest.raises(ValueError, match="threads"):
        get_backend("numba", threads=0)


def test_a_forward_pass_pins_the_caller_and_the_helpers_to_cpus_of_their_own(cpu, monkeypatch):
    """Where the backend uses every CPU the process may run on: the caller on the first during the
    pass (its own affinity back afterwards), each helper thread on another."""
    monkeypatch.delenv("NPRESNET_PIN_THREADS", raising=False)
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    cpus = sorted(os.sched_getaffinity(0))
    backend = cpu.NumbaBackend(threads=len(cpus))
    seen = {}
    max_pool = backend.max_pool

    def recording_max_pool(x):
        out = max_pool(x)
        seen["caller"] = os.sched_getaffinity(0)
        if backend._helpers is not None:
            backend._helpers.run([lambda: None, lambda: seen.update(helper=os.sched_getaffinity(0))])
        return out

    backend.max_pool = recording_max_pool
    model = npresnet.build("resnet18", num_classes=3, backend=backend)
    before = os.sched_getaffinity(0)
    model(np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32))
    assert os.sched_getaffinity(0) == before
    if len(cpus) < 2:  # one CPU: one thread, nothing to place
        assert backend._cpus is None and seen["caller"] == before
        return
    assert backend._cpus == cpus
    assert seen["caller"] == {cpus[0]}
    assert len(seen["helper"]) == 1 and seen["helper"] <= set(cpus[1:])


@pytest.mark.parametrize("spinning", [True, False], ids=["spinning", "sleep-only"])
def test_helpers_run_every_share_and_raise_a_helpers_error(cpu, monkeypatch, spinning):
    """threads.Helpers: each share runs once, the caller's on the caller; a helper's exception reaches
    the caller after every share has ended; the helpers then go on working. Shares handed over back to
    back (the helper spinning) and after a pause longer than its spin (the helper asleep) alike; and
    where the spin-waits cannot be compiled (waits on the condition only)."""
    from npresnet_kernels import threads

    if not spinning:
        monkeypatch.setattr(threads, "_spin_waits", False)  # as after a failed compile
    helpers = threads.Helpers(2)
    assert (helpers._waits is not None) == spinning
    for pause in (0, 2 * threads.SPIN_SECONDS, 0):
        time.sleep(pause)
        ran = []
        helpers.run([lambda i=i: ran.append((i, threading.get_ident())) for i in range(3)])
        assert sorted(i for i, _ in ran) == [0, 1, 2]
        assert dict(ran)[0] == threading.get_ident() and len({t for _, t in ran}) == 3
    ended = []

    def slow_then_fail():
        time.sleep(3 * threads.SPIN_SECONDS)  # longer than the caller spins: it sleeps and is woken
        ended.append(1)
        raise KeyError("from a helper")

    with pytest.raises(KeyError, match="from a helper"):
        helpers.run([lambda: None, slow_then_fail, lambda: ended.append(2)])
    assert sorted(ended) == [1, 2]
    helpers.run([lambda: None, lambda: ended.append(3)])
    assert ended[-1] == 3
    with pytest.raises(ValueError, match="shares"):
        helpers.run([lambda: None] * 4)


def test_helper_threads_end_with_their_backend(cpu):
    """A backend's helper threads end once it is collected (no thread left spinning or asleep for it)."""
    backend = cpu.NumbaBackend(threads=2)
    names = {t.name for t in backend._helpers._threads}
    threads_of_backend = list(backend._helpers._threads)
    del backend
    gc.collect()
    for thread in threads_of_backend:
        thread.join(timeout=5)
    assert not any(t.is_alive() for t in threads_of_backend), names


def test_threads_are_pinned_only_where_the_backend_takes_every_cpu(cpu, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("NPRESNET_PIN_THREADS", raising=False)
    assert cpu.thread_cpus(4) == [0, 1, 2, 3]
    assert cpu.thread_cpus(2) is None  # two processes of two threads each must not share CPUs 0 and 1
    assert cpu.thread_cpus(1) is None
    monkeypatch.setenv("NPRESNET_PIN_THREADS", "0")
    assert cpu.thread_cpus(4) is None


def test_auto_picks_numba_when_installed_and_faster(cpu):
    """A model's "auto" is a long job (backends.choose_backend): numba where it is faster per image
    (basic blocks, in backends.AUTO_COSTS), so it must be installed and found."""
    assert npresnet.backends.AUTO_COSTS["numba"].per_image_ratio("basic", 1) < 1
    assert npresnet.resnet18(num_classes=2).backend.name == "numba"
    assert "numba" in npresnet.available_backends()


def test_without_numba_auto_is_numpy(tmp_path):
    """A machine without numba: 'auto' is NumPy with no error; asking for numba names the fix.
    numba is made absent as an uninstalled package is: `import numba` fails and importlib finds no
    spec for it (the backend looks for numba without importing it)."""
    proc = run_python(
        """
        import sys
        sys.modules["numba"] = None  # import numba raises ImportError; importlib.util.find_spec gives None
        import numpy as np, npresnet
        assert npresnet.get_backend("auto").name == "numpy"
        model = npresnet.resnet18(num_classes=3)
        assert model.backend.name == "numpy"
        assert model(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 3)
        assert npresnet.available_backends() == ["numpy"]
        try:
            npresnet.get_backend("numba")
        except npresnet.BackendUnavailable as exc:
            assert "pip install" in str(exc), exc
        else:
            raise AssertionError("numba backend without numba")
        print("ok")
        """,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_kernel_cache_goes_under_npresnet_home_and_compiling_is_announced(cpu, tmp_path, monkeypatch):
    """Without NUMBA_CACHE_DIR the compiled kernels land in $NPRESNET_HOME/numba (site-packages may be read-only).
    The process that compiles says so once on stderr (a first run must not look like a hang) and imports
    numba with SciPy hidden from it (npresnet_kernels.scipy_hidden_from_numba: numba imports SciPy when
    it is imported and when its CPU target starts, 0.6 s, for nothing our kernels use), leaving SciPy
    importable and a user's numba np.dot (which looks for SciPy's BLAS) working. A process that finds
    the kernels built says nothing and never imports numba. SciPy comes with the test dependencies."""
    code = """
        import sys
        import numpy as np, npresnet
        b = npresnet.get_backend("numba")
        assert "numba" not in sys.modules  # finding the backend imports no compiler
        for dtype in (np.float32, np.float64):
            x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(dtype)
            assert np.array_equal(b.to_numpy(b.max_pool(b.from_numpy(x))), npresnet.functional.max_pool2d(x, 3, 2, 1))
        print("numba" in sys.modules, "scipy" in sys.modules)
        if "numba" in sys.modules:
            import scipy.linalg.cython_blas  # importable again
            import numba
            a = np.arange(3.0)
            assert numba.njit(lambda u, v: np.dot(u, v))(a, a) == 5.0
        """
    env = {"NUMBA_CACHE_DIR": None, "NPRESNET_HOME": str(tmp_path / "home")}
    first = run_python(code, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("compiling the Numba kernels") == 1, first.stderr  # two kernels compiled, one notice
    assert first.stdout.split() == ["True", "False"]  # compiled: numba imported, SciPy not
    built = sorted(f for _, _, files in os.walk(tmp_path / "home" / "numba" / "aot") for f in files)
    assert [f.split(".")[1] for f in built] == ["max_pool_3x3s2"] * 2, built  # one object per dtype
    second = run_python(code, env=env)
    assert second.returncode == 0, second.stderr
    assert "compiling" not in second.stderr, second.stderr
    assert second.stdout.split() == ["False", "False"]  # loaded: no numba in the process
    # Only max pooling was compiled: not warm for a model (what backend "auto" reads).
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("NPRESNET_HOME", str(tmp_path / "home"))
    from npresnet.backends import kernels_cached

    assert not kernels_cached("numba")


def test_blas_thread_count_is_restored_after_a_conv(cpu):
    """The backend runs BLAS single-threaded inside a conv and leaves the user's setting as it found it."""
    get_threads = cpu._openblas()[1] if cpu._openblas() else (lambda: None)  # None: NumPy without OpenBLAS
    before = get_threads()
    backend = cpu.NumbaBackend(threads=2)
    prepared = backend.prepare_conv(FoldedConv(np.ones((4, 4, 1, 1)), np.zeros(4), 1, 0, 1))
    out = backend.conv(backend.from_numpy(np.ones((1, 4, 3, 3))), prepared, relu=True)
    assert np.all(backend.to_numpy(out) == 4.0)
    assert get_threads() == before


# --- helpers' shares made natively, and whole trunks run as plans ------------------------------

def _gemm_case(cpu, dtype=np.float32, M=50, D=24, K=40, seed=11):
    """gemm_packed's arguments for out = a @ w + bias (ReLU), and that result by NumPy."""
    rng = np.random.default_rng(seed)
    a, w = rng.standard_normal((1, M, D)).astype(dtype), rng.standard_normal((1, D, K)).astype(dtype)
    bias, scale = rng.standard_normal(K).astype(dtype), np.ones(K, dtype)
    Wp = cpu.pack_panels(w)
    out = np.full((1, M, K), 7, dtype)
    args = (a, Wp, scale, bias, out, False, True, 0, Wp.shape[1], np.empty((6, Wp.shape[3]), dtype), out)
    return args, out, np.maximum(np.matmul(a, w) + bias, 0)


def test_helpers_make_native_shares_and_report_a_failed_call(cpu):
    """A share recorded with aot.record_calls is made by the helper natively (nothing runs while recording),
    back to back and after the helper has fallen asleep, beside Python shares; a call whose status says it
    failed is raised in the caller as a RuntimeError, and the helpers go on working."""
    from npresnet_kernels import aot, threads

    kernels = cpu.NumbaBackend(threads=1).kernels
    helpers = threads.Helpers(1)
    assert helpers.native
    for pause in (0, 2 * threads.SPIN_SECONDS, 0):
        time.sleep(pause)
        args, out, want = _gemm_case(cpu, seed=int(pause * 1e4))
        with aot.record_calls() as calls:
            kernels.gemm_packed(*args)
        assert len(calls) == 1 and (out == 7).all()  # prepared, not made
        ran = []
        helpers.run([lambda: ran.append(threading.get_ident()), threads.NativeShare(calls)])
        assert ran == [threading.get_ident()]
        assert_close(out, want)
    # A function that fails as a kernel does: numba's status 1.
    failing = aot.compile_ir("define i32 @npresnet_test_fails(i64* %slots) {\n  ret i32 1\n}\n", ["npresnet_test_fails"])
    share = threads.NativeShare([(failing["npresnet_test_fails"], threads._slots_array("q", [0]), ())])
    with pytest.raises(RuntimeError, match="status 1"):
        helpers.run([lambda: None, share])
    args, out, want = _gemm_case(cpu, seed=5)
    with aot.record_calls() as calls:
        kernels.gemm_packed(*args)
    helpers.run([lambda: None, threads.NativeShare(calls)])
    assert_close(out, want)


def test_recording_refuses_what_a_helper_cannot_make_natively(cpu, monkeypatch):
    """record_calls raises NotRecordable for a kernel numba's JIT serves (no slots form) and for an argument
    that is neither an array nor an integer; a backend's layer then runs its helpers' shares in Python,
    with the same result."""
    from npresnet_kernels import aot

    backend = cpu.NumbaBackend(threads=2)
    args, _, _ = _gemm_case(cpu)
    backend.kernels.gemm_packed(*args)  # specialised
    call = next(iter(backend.kernels.gemm_packed.calls.values()))
    with pytest.raises(aot.NotRecordable, match="argument 0.5"):
        aot._prepare(call, args[:7] + (0.5,) + args[8:])
    bad = dict(backend.kernels.gemm_packed.calls)
    monkeypatch.setattr(backend.kernels.gemm_packed, "calls", {k: (lambda a, c=c: c(a)) for k, c in bad.items()})
    with pytest.raises(aot.NotRecordable, match="JIT"), aot.record_calls():
        backend.kernels.gemm_packed(*args)
    shares = []
    run = backend._helpers.run
    monkeypatch.setattr(backend._helpers, "run", lambda s: (shares.append(s), run(s)))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 5, 5)).astype(np.float32)
    conv = FoldedConv(rng.standard_normal((12, 6, 1, 1)).astype(np.float32), np.zeros(12, np.float32), 1, 0, 1)
    got = backend.to_numpy(backend.conv(backend.from_numpy(x), backend.prepare_conv(conv), relu=False))
    assert_close(got, reference_conv(x, conv, False, None))
    assert shares and all(callable(s) for s in shares[-1])  # Python shares, not NativeShares


def test_a_layers_helper_shares_are_native_where_they_can_be(cpu, monkeypatch):
    """Every ungrouped convolution path and the max pool hand their helpers native shares; a grouped
    convolution (NumPy's BLAS between its kernels) Python shares."""
    from npresnet_kernels import threads

    backend = numba_backend(cpu, "winograd4")
    kinds = []
    run = backend._helpers.run
    monkeypatch.setattr(backend._helpers, "run", lambda s: (kinds.append(type(s[1]).__name__), run(s)))
    rng = np.random.default_rng(4)
    for case in ("3x3", "1x1", "3x3_stride2", "7x7_stem", "3x3_groups4"):
        N, C, H, W, K, k, stride, padding, groups = CONV_CASES[case]
        x = rng.standard_normal((N, C, H, W)).astype(np.float32)
        conv = FoldedConv(rng.standard_normal((K, C // groups, k, k)).astype(np.float32), np.zeros(K, np.float32), stride, padding, groups)
        kinds.append(case)
        got = backend.to_numpy(backend.conv(backend.from_numpy(x), backend.prepare_conv(conv), relu=True))
        assert_close(got, reference_conv(x, conv, True, None))
    backend.max_pool(backend.from_numpy(rng.standard_normal((2, 4, 9, 9)).astype(np.float32)))
    native = threads.NativeShare.__name__
    assert kinds == ["3x3", native, "1x1", native, "3x3_stride2", native, "7x7_stem", native, "3x3_groups4", "partial", native]


@pytest.mark.parametrize("tile", [4, 2])
def test_winograd_in_blocks_of_tiles_equals_one_block(cpu, tile):
    """A thread's tiles in blocks (transform, multiply, finish each block while it is in cache) give the
    very numbers of one block of them all."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 8, 17, 13)).astype(np.float32)
    conv = FoldedConv(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), rng.standard_normal(16).astype(np.float32), 1, 1, 1)
    residual = rng.standard_normal((3, 17, 13, 16)).astype(np.float32)
    outs = []
    for block_bytes in (1 << 40, 1):  # one block of all; blocks of 6 tiles (the least)
        backend = numba_backend(cpu, f"winograd{tile}")
        backend.WINOGRAD_BLOCK_BYTES = block_bytes
        prepared = backend.prepare_conv(conv)
        outs.append(backend.conv(backend.from_numpy(x), prepared, True, residual))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert_close(backend.to_numpy(outs[1]), reference_conv(x, conv, True, residual.transpose(0, 3, 1, 2)))


def _plan_models(cpu, arch, threads, dtype, seed=12):
    """Two models on one state: one whose backend runs its trunk as a plan, one layer by layer."""
    spec = get_spec(arch, num_classes=7)
    state = random_state_dict(spec, seed=seed, dtype=dtype)
    layered = cpu.NumbaBackend(threads=threads)
    layered.PLAN_BYTES = 0
    return npresnet.build(spec, state, backend=cpu.NumbaBackend(threads=threads)), npresnet.build(spec, state, backend=layered)


@pytest.mark.parametrize("threads", [2, 1])
@pytest.mark.parametrize("arch, dtype", [("resnet18", np.float32), ("resnet50", np.float32), ("resnet18", np.float64)], ids=str)
def test_a_forward_pass_runs_as_a_plan_with_the_numbers_of_layer_by_layer(cpu, arch, dtype, threads):
    """The first pass at an input shape records the trunk into a plan, every pass after runs it: the same
    kernels, shares and order as layer by layer, so the same numbers bit for bit, for each new input (the
    plan's input is copied in), with logits the caller owns (the next pass does not change them); and the
    reference's numbers."""
    planned, layered = _plan_models(cpu, arch, threads, dtype)
    rng = np.random.default_rng(threads)
    xs = [rng.standard_normal((2, 3, 40, 40)).astype(dtype) for _ in range(3)]
    outs = [planned(x) for x in xs]
    (key, (plan, _, _)), = planned.backend._plans.items()
    assert plan is not None and key[2] == (2, 40, 40, 3) and len(plan.steps) > 20
    assert not layered.backend._plans or all(p is None for p, _, _ in layered.backend._plans.values())
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out, layered(x))
    np.testing.assert_array_equal(outs[0], planned(xs[0]))
    # features() too: a plan of its own, whose stage outputs stay alive to its end (copied out after it).
    got = [planned.features(x) for x in xs[:2]]
    assert sum(plan is not None for plan, _, _ in planned.backend._plans.values()) == 2
    for x, features in zip(xs[:2], got):
        want = layered.features(x)
        assert list(features) == list(want) == ["stem", "layer1", "layer2", "layer3", "layer4", "pool"]
        for name in want:
            np.testing.assert_array_equal(features[name], want[name])
    assert_close(outs[2], npresnet.build(planned.spec, planned.state_dict(), backend="numpy")(xs[2]))


def test_a_plans_arena_gives_activations_alive_together_bytes_of_their_own(cpu):
    """_arena_layout: any two activations alive at a same step (from the first step that refers to one to
    the last) get disjoint bytes of the arena, and the arena is much smaller than all of them."""
    model, _ = _plan_models(cpu, "resnet50", 2, np.float32)
    backend = model.backend
    h = backend.from_numpy(np.zeros((1, 3, 64, 64), np.float32))
    steps, activations, output = backend._record_pass(type(model)._classify, model._prepare(np.dtype(np.float32)), h)
    offsets, size = cpu._arena_layout(steps, activations, output)
    spans = cpu._alive(steps, activations, output)
    # Every activation is written by one step and read by a later one (the output: read after the plan).
    assert len(activations) > 50 and all(first < last for first, last in spans)
    assert spans[[a is cpu._root(output) for a in activations].index(True)][1] == len(steps)  # (logits: a view)
    for i in range(len(activations)):
        for j in range(i):
            if spans[i][0] <= spans[j][1] and spans[j][0] <= spans[i][1]:
                a = (offsets[i], offsets[i] + activations[i].nbytes)
                b = (offsets[j], offsets[j] + activations[j].nbytes)
                assert a[1] <= b[0] or b[1] <= a[0], (i, j)
    assert max(o + a.nbytes for o, a in zip(offsets, activations)) <= size < sum(a.nbytes for a in activations) / 3


def test_plans_fall_back_to_layer_by_layer_and_are_bounded(cpu):
    """No plan for a trunk with a grouped convolution (Python between its kernels) nor one over PLAN_BYTES:
    those run layer by layer, with the right numbers; at most PLANS_KEPT plans, the least recently used
    dropped."""
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    spec = get_spec("resnext50_32x4d", num_classes=3)
    state = random_state_dict(spec, seed=2)
    grouped = npresnet.build(spec, state, backend=cpu.NumbaBackend(threads=2))
    assert_close(grouped(x), npresnet.build(spec, state, backend="numpy")(x))
    assert [plan for plan, _, _ in grouped.backend._plans.values()] == [None]
    planned, _ = _plan_models(cpu, "resnet18", 2, np.float32)
    planned.backend.PLAN_BYTES = 1000
    planned(x)
    assert [plan for plan, _, _ in planned.backend._plans.values()] == [None]
    planned.backend.PLAN_BYTES = cpu.NumbaBackend.PLAN_BYTES
    planned.backend._plans.clear()
    sizes = [32, 40, 48, 56, 64, 32]
    for size in sizes:
        planned(np.zeros((1, 3, size, size), np.float32))
    kept = [key[2][1] for key in planned.backend._plans]  # (N, H, W, C) of the input
    assert kept == [48, 56, 64, 32][-planned.backend.PLANS_KEPT:] and len(kept) == planned.backend.PLANS_KEPT == 4
    # Weights prepared anew (after training, say): the old network's plans, and its weights, go with it.
    old = weakref.ref(planned._prepare(np.dtype(np.float32)))
    planned.invalidate()
    planned(x)
    gc.collect()
    assert old() is None and len(planned.backend._plans) == 1


def test_a_plan_whose_helper_idles_longer_than_its_spin_goes_on(cpu):
    """Helpers.run_plan: a helper with no share in a step that outlasts its spin (SPIN_SECONDS) spins on
    rather than falling asleep, and makes its share of the next step; then the pool works as before."""
    from npresnet_kernels import aot, threads

    kernels = cpu.NumbaBackend(threads=1).kernels
    helpers = threads.Helpers(1)
    long_args, long_out, long_want = _gemm_case(cpu, M=12000, D=256, K=256, seed=1)  # about 10 ms
    args, out, want = _gemm_case(cpu, seed=2)
    with aot.record_calls() as long_calls:
        kernels.gemm_packed(*long_args)
    with aot.record_calls() as calls:
        kernels.gemm_packed(*args)
    time.sleep(2 * threads.SPIN_SECONDS)  # the helper asleep before the plan
    start = time.perf_counter()
    helpers.run_plan(threads.Plan([[threads.NativeShare(long_calls), None], [None, threads.NativeShare(calls)]]))
    assert time.perf_counter() - start > threads.SPIN_SECONDS
    assert_close(long_out, long_want)
    assert_close(out, want)
    ran = []
    helpers.run([lambda: None, lambda: ran.append(1)])
    assert ran == [1]
