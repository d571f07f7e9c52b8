"""The kernels built ahead of time (npresnet_kernels.aot): object files checked, loaded and called as
numba's own dispatchers were, and numba's JIT where they cannot be.

The backend's ops against the NumPy reference, through these kernels, are test_kernels_cpu's."""
import os

import numpy as np
import pytest

from npresnet import functional as F

pytest.importorskip("numba")
from npresnet_kernels import aot  # noqa: E402

MODULE = "npresnet_kernels.cpu_kernels"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty kernel cache for the test."""
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("NPRESNET_HOME", str(tmp_path))
    return tmp_path / "numba" / "aot"


def pool(kernel, x):
    """max_pool_3x3s2 of NCHW x through `kernel`, over NHWC as the backend lays it out."""
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    N, H, W, C = nhwc.shape
    out = np.full((N, (H + 1) // 2, (W + 1) // 2, C), np.nan, dtype=x.dtype)
    kernel(nhwc, 0, N * out.shape[1], out)
    return out.transpose(0, 3, 1, 2)


def test_undefined_symbols_reads_an_elf_objects_symbol_table():
    llvm = aot._llvm()
    module = llvm.parse_assembly(
        """
        declare double @some_external(double)
        define double @f(double %x) {
          %y = call double @some_external(double %x)
          ret double %y
        }
        """
    )
    target = llvm.Target.from_default_triple().create_target_machine(reloc="pic")
    obj = target.emit_object(module)
    # (and, for position-independent code, the linker's _GLOBAL_OFFSET_TABLE_, which MCJIT provides)
    assert set(aot.undefined_symbols(obj)) - aot._LINKER_SYMBOLS == {"some_external"}
    with pytest.raises(aot.AotUnavailable, match="ELF"):
        aot.undefined_symbols(b"MZ" + obj[2:])


def winograd_input(kernel, x):
    """winograd_input's V (F(2x2): 16 tile elements) of NHWC x (a kernel that takes any layout for x)."""
    N, H, W, C = x.shape
    tiles = N * -(-H // 2) * -(-W // 2)
    V = np.full((16, tiles, C), np.nan)
    kernel(x, 2, 0, tiles, np.empty((2, 4, 4, C)), V)
    return V


def test_a_kernel_is_built_once_then_loaded_and_strided_arrays_pass_whole(cache):
    """A strided view (numba layout 'A') reaches the kernel with its strides (the same numbers as its
    contiguous copy); the object is written once per argument types and a fresh table (as in a new
    process) loads it instead of building."""
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 14))
    for view in (x, x.astype(np.float32)):
        assert np.array_equal(pool(aot.Kernel(MODULE, "max_pool_3x3s2"), view), F.max_pool2d(view, 3, 2, 1))
    strided = x.transpose(0, 2, 3, 1)[:, :, ::2]
    assert not strided.flags.c_contiguous
    got = winograd_input(aot.Kernel(MODULE, "winograd_input"), strided)
    np.testing.assert_array_equal(got, winograd_input(aot.Kernel(MODULE, "winograd_input"), np.ascontiguousarray(strided)))
    assert not np.isnan(got).any()
    objects = sorted(cache.rglob("*.o"))
    assert len(objects) == 4  # the pool in float64 and float32; the transform of a strided and a contiguous x
    assert all(p.parent == cache / aot.source_key(MODULE) / aot.cpu_key() for p in objects)
    times = [p.stat().st_mtime_ns for p in objects]
    assert np.array_equal(pool(aot.Kernel(MODULE, "max_pool_3x3s2"), x), F.max_pool2d(x, 3, 2, 1))
    assert [p.stat().st_mtime_ns for p in objects] == times  # loaded, not built again


def test_a_damaged_object_is_built_again(cache):
    x = np.random.default_rng(1).standard_normal((1, 2, 6, 6))
    assert np.array_equal(pool(aot.Kernel(MODULE, "max_pool_3x3s2"), x), F.max_pool2d(x, 3, 2, 1))
    (path,) = cache.rglob("*.o")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the machine code: the SHA-256 no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        aot._unpack(path.read_bytes())
    assert np.array_equal(pool(aot.Kernel(MODULE, "max_pool_3x3s2"), x), F.max_pool2d(x, 3, 2, 1))
    aot._unpack(path.read_bytes())  # whole again


def test_where_an_object_would_need_a_symbol_this_process_lacks_numbas_jit_runs_the_kernel(cache, monkeypatch):
    """E.g. one of numba's C helpers (which live in numba's extension modules): the object is not kept."""
    monkeypatch.setattr(aot, "undefined_symbols", lambda obj: ["numba_attempt_nocopy_reshape"])
    kernel = aot.Kernel(MODULE, "max_pool_3x3s2")
    x = np.random.default_rng(2).standard_normal((1, 2, 6, 6))
    assert np.array_equal(pool(kernel, x), F.max_pool2d(x, 3, 2, 1))
    assert not list(cache.rglob("*.o"))
    (call,) = kernel.calls.values()
    assert "dispatcher" in call.__code__.co_freevars  # the JIT's


def test_without_ahead_of_time_support_numbas_jit_runs_the_kernel(cache, monkeypatch):
    monkeypatch.setattr(aot, "aot_supported", lambda: False)
    kernel = aot.Kernel(MODULE, "max_pool_3x3s2")
    x = np.random.default_rng(3).standard_normal((1, 2, 6, 6)).astype(np.float32)
    assert np.array_equal(pool(kernel, x), F.max_pool2d(x, 3, 2, 1))
    assert not list(cache.rglob("*.o"))


def test_a_table_has_the_modules_kernels_only():
    table = aot.KernelTable(MODULE)
    assert isinstance(table.gemm_packed, aot.Kernel)
    assert table.gemm_packed is table.gemm_packed
    with pytest.raises(AttributeError):
        table.not_a_kernel


def test_threads_meeting_a_new_kernel_build_it_once(cache):
    """The backend's pool threads reach a kernel's first call together, with arguments that differ only
    as an int and an np.int64 do: one build, one object."""
    import threading

    table = aot.KernelTable(MODULE)
    x = np.random.default_rng(5).standard_normal((2, 6, 6, 3))
    outs = [np.empty((2, 3, 3, 3)) for _ in range(4)]
    builds, loads = [], []
    real_build, real_load = aot.build, aot.load

    def counted_build(*args):
        builds.append(args[1])
        return real_build(*args)

    def counted_load(header, obj):
        loads.append(header["kernel"])
        return real_load(header, obj)

    aot.build, aot.load = counted_build, counted_load
    try:
        threads = [threading.Thread(target=table.max_pool_3x3s2, args=(x, 0, np.int64(6) if i % 2 else 6, out))
                   for i, out in enumerate(outs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        aot.build, aot.load = real_build, real_load
    assert builds == loads == ["max_pool_3x3s2"]  # once, though the int and the np.int64 call differ
    expected = F.max_pool2d(x.transpose(0, 3, 1, 2), 3, 2, 1).transpose(0, 2, 3, 1)
    assert all(np.array_equal(out, expected) for out in outs)
    assert len(list(cache.rglob("*.o"))) == 1


def test_a_read_only_cache_still_runs(cache):
    cache.mkdir(parents=True)
    os.chmod(cache, 0o500)
    try:
        if os.access(cache, os.W_OK):  # root ignores the mode: make the cache a file instead
            os.chmod(cache, 0o700)
            cache.rmdir()
            cache.write_bytes(b"")
        x = np.random.default_rng(4).standard_normal((1, 2, 6, 6))
        assert np.array_equal(pool(aot.Kernel(MODULE, "max_pool_3x3s2"), x), F.max_pool2d(x, 3, 2, 1))
    finally:
        if cache.is_dir():
            os.chmod(cache, 0o700)


def test_a_build_that_fails_unexpectedly_says_so_and_numbas_jit_runs_the_kernel(cache, monkeypatch, caplog):
    """E.g. a numba whose ahead-of-time compiler has changed: one warning, and the JIT."""
    def broken(*args):
        raise RuntimeError("no such compiler")

    monkeypatch.setattr(aot, "build", broken)
    kernel = aot.Kernel(MODULE, "max_pool_3x3s2")
    x = np.random.default_rng(6).standard_normal((1, 2, 6, 6))
    with caplog.at_level("WARNING", logger="npresnet"):
        assert np.array_equal(pool(kernel, x), F.max_pool2d(x, 3, 2, 1))
    assert "max_pool_3x3s2 could not be built ahead of time (RuntimeError: no such compiler)" in caplog.text
    assert not list(cache.rglob("*.o"))


def test_numpy_scalars_pass_as_pythons_do(cache):
    """The epilogue with its flags as np.bool_ (which ctypes does not take) and as bool: the same kernel."""
    rng = np.random.default_rng(7)
    src, residual = rng.standard_normal((1, 5, 4)), rng.standard_normal((5, 4))
    scale, bias = rng.standard_normal(4), rng.standard_normal(4)
    kernel = aot.Kernel(MODULE, "epilogue")
    expected = np.maximum(src[0] * scale + bias + residual, 0)
    for flag in (True, np.True_):
        out = np.full((5, 4), np.nan)
        kernel(src, scale, bias, residual, flag, flag, out)
        np.testing.assert_array_equal(out, expected)
    assert len(kernel.specialisations) == 1


# --- building in the background (build mode "background", a user's default; the suite waits: conftest) --


def test_a_first_run_computes_on_numpy_while_the_builder_builds_then_runs_the_kernels(cache, monkeypatch, caplog):
    """Empty cache, build mode background: the first forward pass hands every kernel it meets to one
    builder process and gives NumPy's answer meanwhile (no kernel loaded); once the builder is done, the
    objects are in the cache and the next pass runs them."""
    import npresnet
    import npresnet_kernels
    from helpers import assert_close
    from npresnet_kernels.cpu import NumbaBackend

    monkeypatch.setenv("NPRESNET_KERNEL_BUILD", "background")
    monkeypatch.setattr(aot, "_builder", aot._Builder())
    monkeypatch.setattr(npresnet_kernels, "_announced", set())
    model = npresnet.build("resnet18", backend="numpy", num_classes=10)
    x = np.random.default_rng(8).standard_normal((2, 3, 64, 64)).astype(np.float32)
    expected = model(x)
    backend = NumbaBackend(threads=2)
    backend.kernels = table = aot.KernelTable(MODULE)  # this test's kernels: none loaded yet in this process
    model.use_backend(backend)
    with caplog.at_level("WARNING", logger="npresnet"):
        assert_close(model(x), expected)
    assert "in the background" in caplog.text
    assert not backend._plans  # no plan while kernels are being built: the next pass tries again
    kernels = {name: getattr(table, name) for name in aot.declared_kernels(MODULE)}
    assert not any(k.specialisations for k in kernels.values())  # every layer ran on NumPy
    asked = {os.path.basename(path).split(".")[1] for path in aot._builder.sent}
    assert {"conv_packed", "max_pool_3x3s2"} <= asked
    assert len({id(p) for p in aot._builder.sent.values()}) == 1  # one builder for all of them
    # on every CPU the process may use, not on the CPU of the pinned thread (cpu.thread_cpus) that started it
    assert os.sched_getaffinity(aot._builder.process.pid) == os.sched_getaffinity(0)

    assert aot.wait_for_builds(timeout=600)
    assert {p.name.split(".")[1] for p in cache.rglob("*.o")} == asked
    assert_close(model(x), expected)
    assert {name for name, k in kernels.items() if k.specialisations} == asked  # the kernels ran
    assert [plan is not None for plan, _, _ in backend._plans.values()] == [True]  # and as a plan
    assert_close(model(x), expected)


def test_outside_a_deferring_caller_a_kernel_is_built_before_it_runs(cache, monkeypatch):
    """Build mode background defers only the calls a caller (the backend) can do another way."""
    monkeypatch.setenv("NPRESNET_KERNEL_BUILD", "background")
    monkeypatch.setattr(aot, "_builder", aot._Builder())
    x = np.random.default_rng(9).standard_normal((1, 2, 6, 6))
    assert np.array_equal(pool(aot.Kernel(MODULE, "max_pool_3x3s2"), x), F.max_pool2d(x, 3, 2, 1))
    assert not aot._builder.sent
    assert len(list(cache.rglob("*.o"))) == 1


def test_a_request_the_builder_cannot_build_is_logged_and_then_refused(cache):
    """The caller then builds in its own process (which says why it cannot)."""
    builder = aot._Builder()
    path = str(cache / "cpu_kernels.no_such_kernel.o")
    codes = (aot.arg_code(np.zeros(2)),)
    assert builder.request(MODULE, "no_such_kernel", codes, path)
    assert builder.wait(timeout=300)
    assert not builder.request(MODULE, "no_such_kernel", codes, path)
    assert not os.path.exists(path)
    log = (cache / "builder.log").read_text()
    assert "no_such_kernel" in log and "KeyError" in log


def test_a_bad_build_mode_is_named(monkeypatch):
    from npresnet import backends

    monkeypatch.setenv("NPRESNET_KERNEL_BUILD", "later")
    with pytest.raises(ValueError, match="NPRESNET_KERNEL_BUILD must be one of background, wait, not 'later'"):
        backends.build_mode()


def test_a_layer_split_between_threads_returns_only_when_every_share_has_ended():
    """Also when the caller's share raises: a helper still writing behind it would race what comes next."""
    import threading
    import time

    from npresnet_kernels.cpu import NumbaBackend

    backend = NumbaBackend(threads=2)
    ended = threading.Event()

    def work(lo, hi):
        if lo == 0:
            raise RuntimeError("the caller's share failed")
        time.sleep(0.3)
        ended.set()

    with pytest.raises(RuntimeError, match="caller's share"):
        backend._split(work, 2)
    assert ended.is_set()


def test_a_frozen_application_builds_in_its_own_process(cache, monkeypatch):
    """Its sys.executable is the application, not a Python: no builder is started from it."""
    import sys

    monkeypatch.setattr(sys, "frozen", True, raising=False)
    builder = aot._Builder()
    assert not builder.request(MODULE, "max_pool_3x3s2", (aot.arg_code(np.zeros(2)),), str(cache / "x.o"))
    assert builder.process is None


def test_a_training_steps_convolution_runs_on_numpy_while_its_kernels_are_built(cache, monkeypatch):
    """The training ops' convolutions (StepConv, whose weights change every step) take the same
    stand-in as inference's: the layer's NumPy reference, from the weights as given."""
    from npresnet.backends import FoldedConv
    from npresnet_kernels.train import StepBackend, StepConv

    monkeypatch.setenv("NPRESNET_KERNEL_BUILD", "background")
    monkeypatch.setattr(aot, "_builder", aot._Builder())
    backend = StepBackend(threads=2)
    backend.kernels = aot.KernelTable(MODULE)  # none loaded yet in this process
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    for winograd, stride in ((True, 1), (False, 2)):
        w = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
        conv = StepConv(FoldedConv(w, np.zeros(5, np.float32), stride, 1, 1), winograd, backend)
        out = backend.to_numpy(backend.conv(backend.from_numpy(x), conv, relu=False))
        assert np.allclose(out, F.conv2d(x, w, stride=stride, padding=1), rtol=1e-5, atol=1e-5)
    assert aot._builder.sent  # the kernels were asked for, not run
    assert aot.wait_for_builds(timeout=600)


def test_a_thread_outside_a_deferring_block_builds_while_another_thread_defers(cache, monkeypatch):
    """Deferral belongs to the thread in the block (and the helpers it hands shares to): a kernel
    called elsewhere meanwhile, by code that cannot do the step another way, still runs."""
    import threading

    monkeypatch.setenv("NPRESNET_KERNEL_BUILD", "background")
    monkeypatch.setattr(aot, "_builder", aot._Builder())
    inside, done = threading.Event(), threading.Event()

    def defer():
        with aot.DeferredBuilds():
            inside.set()
            done.wait(60)

    other = threading.Thread(target=defer)
    other.start()
    try:
        assert inside.wait(60)
        x = np.random.default_rng(11).standard_normal((1, 2, 6, 6))
        assert np.array_equal(pool(aot.Kernel(MODULE, "max_pool_3x3s2"), x), F.max_pool2d(x, 3, 2, 1))
        assert not aot._builder.sent
    finally:
        done.set()
        other.join()
    assert not aot.deferring()
