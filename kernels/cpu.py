"""Numba CPU kernels: the "numba" backend (NHWC activations, fused epilogues, Winograd 3x3).

Importing this module registers the backend with ``npresnet.backends``; it raises
ImportError where numba is not installed, so ``backend="auto"`` falls back to NumPy. It does
not import numba: the kernels (``cpu_kernels.py``) are built ahead of time by ``aot.py``, each
at its first call in the first process that needs it, into the kernel cache, and later
processes load them without numba. Creating the first ``NumbaBackend`` finds the OpenBLAS that
NumPy loaded, to run it single-threaded where the backend calls it. No kernel is a parallel
numba loop: the backend's own helper threads (``threads.py``) split each layer.

Variants, chosen on each call in ``NumbaBackend.conv``, one method each:
    winograd  3x3, stride 1, padding 1, groups 1: Winograd F(m x m, 3x3), m = 4 or 2
              (float32 and float64; chosen per call from the number of tiles, see
              NumbaBackend._winograd_tile): input transform -> one GEMM per tile
              element (gemm_packed) -> output transform with bias, residual and
              ReLU fused, so each output activation is written once.
    1x1       1x1 stride-1 convolutions (groups 1): the NHWC activation is already the
              GEMM's left matrix; gemm_packed finishes bias/residual/ReLU in registers.
    direct    other convolutions of groups 1 (the 7x7 stem, stride-2 3x3 and 1x1, 3x3 on maps too
              small for Winograd): conv_packed, gemm_packed's loop reading each window
              in place from the input padded once (an implicit GEMM: no patch matrix).
    im2col    grouped convolutions (ResNeXt's 3x3): NHWC patches gathered, one BLAS GEMM
              per group, fused epilogue.
    The 1x1, direct and im2col paths hand each thread one share of the output rows (or,
    where the weights outweigh the patches, of the output channels) and let it gather,
    multiply and finish its share alone: one thread synchronisation per layer. Winograd's
    shares go in blocks of tiles whose V and M stay in cache (WINOGRAD_BLOCK_BYTES).

A helper's share whose Python only calls kernels (every path but im2col's, which calls BLAS) is
recorded by the caller and made by the helper natively, without the GIL (``threads.py``). And a
model's forward pass (stem to fc) is recorded once per input shape into a plan (``run_network``): every
layer's shares as native calls, the activations in one arena laid out by when each is needed, run
afterwards in a single native call with no Python between layers; resnet18 and resnet50 at batch 1
ran 17% faster than layer by layer with Python shares (bench/results/notes.md).

The GEMMs of ungrouped convolutions run in gemm_packed, a register-blocked SIMD kernel over
weights packed into panels (``cpu_kernels.py``). Grouped convolutions use NumPy's BLAS
(numba's own np.dot would need SciPy), set to one thread meanwhile. The backend's helper
threads (``threads.py``; the nogil kernels and BLAS release the GIL) take each one share of the
layer, which it gathers or transforms, multiplies and finishes alone: one thread synchronisation
per convolution, handed over by spinning rather than by waking a sleeping thread (a wake-up cost
60-150 us: bench/results/notes.md), and OpenBLAS's own threads (which spin after each call) stay idle. Max pooling is split the same way: no kernel is a parallel Numba
loop, whose threading layer and parfor compilation cost seconds of start-up.

Numerics: no fastmath (NaN and inf behave as in the reference); gemm_packed uses fused
multiply-adds (llvm.fma: one rounding per step, no reassociation), and the Winograd
weight transform is done in float64 and rounded once. A model's batch norm is not folded
into the weights here: its scale multiplies each sum in the epilogue (in U for Winograd), so
that the packed weights are the model's own, reordered, and the model need not keep another
copy (``NumbaBackend.keeps_weights``). Measured against the
float64 reference: see bench/ and tests/test_kernels_cpu.py.

Compiled kernels are cached on disk under ``npresnet.backends.kernel_cache_dir()``
($NUMBA_CACHE_DIR when the user set it, else $NPRESNET_HOME/numba, else
~/.cache/npresnet/numba), so a read-only site-packages still gets a cache: the ahead-of-time
objects under aot/ (``aot.py``), and numba's own cache for any kernel that falls back to its JIT.
A kernel not yet built is handed to aot.py's background builder, and its layer runs on NumPy
(``_conv_numpy``, functional.max_pool2d) until the kernel is there (NPRESNET_KERNEL_BUILD=wait
builds it first instead); the first build in a process says so on stderr (the "npresnet" logger),
so a first run never looks like a hang.

References: see ``cpu_kernels.py``.
Tests: ``python -m pytest -q tests/test_kernels_cpu.py``; speed: ``python bench/run.py``.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import math
import os
import sys
import threading
import weakref

import numpy as np

from npresnet.backends import Backend, ConvBatchNorm, FoldedConv, register_backend
from npresnet import functional as F
from npresnet.functional import conv_output_size

from .aot import DeferredBuilds, NotRecordable, NotYetBuilt, deferring, kernel_table, record_calls, simd_bytes
from .threads import Helpers, NativeShare, Plan, run_plan_alone, spin_waits

if importlib.util.find_spec("numba") is None:  # found, not imported (a second): the kernels are built with it
    raise ImportError("No module named 'numba'")

KERNELS = "npresnet_kernels.cpu_kernels"


def thread_cpus(threads: int) -> list[int] | None:
    """The CPUs the backend's threads are pinned to during a forward pass (the caller on the first, each
    helper on one of the others), or None to leave them to the scheduler.

    Pinned where the backend uses every CPU this process may run on (its default), and
    $NPRESNET_PIN_THREADS is not 0: there is no choice of CPUs to take away then. Left free, on a
    virtual machine a forward pass after an idle spell ran its two threads on one CPU (most likely
    because the other, halted by the host, looked taken to the guest's scheduler): resnet18 batch 1
    took 40 ms instead of 26, the next pass 27 instead of 22.5 (bench/results/notes.md). Fewer
    threads than CPUs: not pinned, so that two processes never pile onto the same CPUs. The helpers
    stay pinned between passes; a training pass pins the caller as a forward pass does
    (TrainingOps.running): the caller waits for its helpers spinning (threads.py), and left free it
    could share a helper's CPU (a resnet18 step at 112 took 0.97x the time pinned: paired, 12 steps).
    """
    if threads < 2 or not hasattr(os, "sched_setaffinity") or os.environ.get("NPRESNET_PIN_THREADS", "1") == "0":
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if len(cpus) == threads else None


# glibc's malloc options (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_kept_freed_memory: bool | None = None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the process's next allocations, once per process: arrays up
    to 32 MiB from the heap (M_MMAP_THRESHOLD, glibc's own ceiling for it) and the heap not given back to
    the system until 1 GiB of it is free (M_TRIM_THRESHOLD).

    By default glibc gave the freed activations of a forward pass back and the next pass faulted them in
    again, a page at a time: resnet50 at batch 8 took 2,300 page faults a forward (up to 50 ms of system
    time) and ran 4-5% slower, a resnet18 training step 10,000 (bench/results/notes.md). The process keeps
    its peak memory instead of returning it between passes. Process-wide, so the backend does it when first
    created, not at import; NPRESNET_KEEP_FREED_MEMORY=0 leaves malloc as it was. Returns whether malloc
    was set (only with glibc).
    """
    global _kept_freed_memory
    if _kept_freed_memory is None:
        _kept_freed_memory = False
        if os.environ.get("NPRESNET_KEEP_FREED_MEMORY", "1") != "0" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                libc.gnu_get_libc_version  # glibc's: musl's mallopt does nothing
                mallopt = libc.mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _kept_freed_memory = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _kept_freed_memory


def max_threads() -> int:
    """The most threads the backend uses: $NUMBA_NUM_THREADS if set, else the CPUs this process may run on (numba's rule)."""
    if os.environ.get("NUMBA_NUM_THREADS"):
        return max(1, int(os.environ["NUMBA_NUM_THREADS"]))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


WINOGRAD = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64),
    ),
    4: (
        np.array(
            [
                [4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1],
            ],
            dtype=np.float64,
        ),
        np.array(
            [
                [1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1],
            ],
            dtype=np.float64,
        ),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=np.float64),
    ),
}


def panel_width(dtype) -> int:
    """NR, the output channels of one packed panel: two of the kernels' SIMD vectors (aot.simd_bytes:
    with AVX-512 32 float32 or 16 float64, with AVX2 16 or 8)."""
    return 2 * simd_bytes() // np.dtype(dtype).itemsize


def winograd_fits(R: int, S: int, stride: int, padding: int, groups: int) -> bool:
    """Whether the Winograd kernels compute this convolution: 3x3, stride 1, padding 1, groups 1."""
    return (R, S, stride, padding, groups) == (3, 3, 1, 1, 1)


def pack_panels(w: np.ndarray, dtype=None) -> np.ndarray:
    """w (E, ..., K) -> (E, ceil(K/NR), D, NR) in `dtype` (default w's), D the product of the middle
    axes in C order: gemm_packed's weights, NR = panel_width(dtype) output channels, the last panel
    zero-padded. Filled panel by panel from w as it is (a transposed view will do), so that packing holds
    no whole-size temporary beside its result."""
    dtype = np.dtype(dtype or w.dtype)
    E, K = w.shape[0], w.shape[-1]
    D = math.prod(w.shape[1:-1])
    NR = panel_width(dtype)
    panels = -(-K // NR)
    packed = np.empty((E, panels, D, NR), dtype=dtype)
    for p in range(panels):
        width = min(NR, K - p * NR)
        packed[:, p, :, :width] = w[..., p * NR : p * NR + width].reshape(E, D, width)
        packed[:, p, :, width:] = 0
    return packed


class PreparedConv:
    """A convolution in the forms its kernels want (see the module docstring for the variants):
    y = conv2d(x, weight) * scale + bias, scale and bias per output channel.

    Groups 1: Wp (1, ceil(K/NR), R*S*C, NR), the GEMM's weights (R*S*C, K) packed for gemm_packed
    (pack_panels). Grouped: W (G, R*S*C/G, K/G) for NumPy's BLAS. Both are the weights as given,
    reordered, so that plain_weights gives them back bit for bit. For 3x3 stride-1 convolutions also
    the Winograd weights U of each tile size, made on first use: G (g * scale) G^T for each of the A*A
    tile elements, (A*A, C, K) packed the same way.

    scale: a batch norm's scale (K,), float64, applied after the sum (None: 1, a folded convolution),
    so that the weights need no folded copy.
    """

    def __init__(self, conv: FoldedConv, scale: np.ndarray | None = None):
        K, Cg, R, S = conv.weight.shape
        G = conv.groups
        self.K, self.Cg, self.R, self.S, self.G = K, Cg, R, S, G
        self.stride, self.padding = conv.stride, conv.padding
        self.dtype = conv.weight.dtype
        self.bias = np.ascontiguousarray(conv.bias)
        self.batch_norm_scale = scale
        self.scale = np.ones(K, dtype=self.dtype) if scale is None else scale.astype(self.dtype)
        self.winograd = self.runs_winograd(conv)
        self.W = self.Wp = None
        if G == 1:
            self.Wp = self.pack(conv.weight)
        else:
            w = conv.weight.reshape(G, K // G, Cg, R, S).transpose(0, 3, 4, 2, 1)  # (G, R, S, C/G, K/G)
            self.W = np.ascontiguousarray(w.reshape(G, R * S * Cg, K // G))
        self._U: dict[int, np.ndarray] = {}
        # The scale and bias of Winograd's GEMMs: the batch norm's scale is in U, its bias added by the output transform.
        self.zeros = np.zeros(K, dtype=self.dtype) if self.winograd else None
        self.ones = np.ones(K, dtype=self.dtype) if self.winograd else None

    def runs_winograd(self, conv: FoldedConv) -> bool:
        """Whether Winograd may run this convolution (winograd_fits); a subclass may narrow it."""
        return winograd_fits(*conv.weight.shape[2:], conv.stride, conv.padding, conv.groups)

    def pack(self, weight: np.ndarray) -> np.ndarray:
        """Wp of groups-1 weights (K, C, R, S); a subclass may pack them another way."""
        return pack_panels(weight.transpose(2, 3, 1, 0)[None])  # from (1, R, S, C, K), a view

    def plain_weights(self) -> np.ndarray:
        """The weights as (G, R*S*C/G, K/G), unpacked if packed."""
        if self.W is not None:
            return self.W
        _, panels, D, NR = self.Wp.shape
        return self.Wp.transpose(0, 2, 1, 3).reshape(1, D, panels * NR)[:, :, : self.K]

    def weight(self) -> np.ndarray:
        """The weights (K, C/G, R, S) as given, bit for bit: a new array."""
        G, K, Cg, R, S = self.G, self.K, self.Cg, self.R, self.S
        w = self.plain_weights().reshape(G, R, S, Cg, K // G).transpose(0, 4, 3, 1, 2)  # (G, K/G, C/G, R, S)
        return np.ascontiguousarray(w).reshape(K, Cg, R, S)

    def U(self, tile: int) -> np.ndarray:
        if tile not in self._U:
            _, Gm, _ = WINOGRAD[tile]
            A = tile + 2
            _, panels, D, NR = self.Wp.shape
            scale = np.zeros(panels * NR)  # (the last panel's padding has zero weights)
            scale[: self.K] = 1 if self.batch_norm_scale is None else self.batch_norm_scale
            U = np.empty((A * A, panels, self.Cg, NR), dtype=self.dtype)
            # U = G g G^T for every (input, output) channel pair, in float64 and rounded once; a panel of
            # NR output channels at a time, straight into gemm_packed's layout (as pack_panels would put it).
            for p in range(panels):
                g = self.Wp[0, p].astype(np.float64) * scale[p * NR : (p + 1) * NR]  # (R*S*C, NR)
                rows = np.matmul(Gm, g.reshape(3, 3 * self.Cg * NR)).reshape(A, 3, self.Cg * NR)  # (A, S, C*NR)
                U[:, p] = np.matmul(Gm, rows).reshape(A * A, self.Cg, NR)  # (A, A, C*NR)
            self._U[tile] = U
        return self._U[tile]


class NumbaBackend(Backend):
    """Numba kernels over NHWC activations, BLAS for the GEMMs; see the module docstring."""

    name = "numba"
    # Not thread-safe: a grouped convolution sets OpenBLAS's process-wide thread count for its duration,
    # and the per-thread workspaces assume one caller at a time.
    thread_safe = False
    # Winograd only with at least this many tiles per call (see _winograd_tile).
    MIN_TILES = 32
    WINOGRAD_BLOCK_BYTES = 1 << 20
    # The most activation memory a plan (run_network) keeps (about what a pass layer by layer holds at its
    # peak: resnet50 at batch 8 79 MB); larger inputs run layer by layer. And the most plans kept (input
    # shapes, networks), the least recently used dropped.
    PLAN_BYTES = 128 << 20
    PLANS_KEPT = 4
    # Rows of the GEMM paths are gathered, multiplied and finished in chunks of at least this many
    # bytes of patches (or outputs), which bounds the patch workspace at large batches; smaller
    # chunks make small, slow GEMMs (bench/results/notes.md).
    CHUNK_BYTES = 1 << 20

    def __init__(self, threads: int | None = None, winograd_tile: int = 4):
        _openblas()
        keep_freed_memory()
        self.kernels = kernel_table(KERNELS)
        self.threads = min(threads or max_threads(), max_threads())
        self.winograd_tile = winograd_tile
        self._local = threading.local()
        self._share_spaces: dict[int, dict] = {}  # the workspaces of each helper's recorded shares (_record)
        self._plans: dict[tuple, tuple] = {}  # run_network's, by (net, network function, input shape, dtype)
        self._plan_steps = self._plan_pending = self._plan_activations = None  # while a plan is being recorded
        self._plan_arena = (None, None)
        self._cpus = thread_cpus(self.threads)
        # Helper threads, one per thread beyond the caller, each pinned to a CPU of its own where _cpus says.
        self._helpers = Helpers(self.threads - 1, self._cpus[1:] if self._cpus else None) if self.threads > 1 else None

    # --- threads ---------------------------------------------------------------------------

    def _split(self, work, length, native=False):
        """work(lo, hi) over [0, length) cut into one contiguous share per thread; returns when all are done.

        Each share does its whole layer step (gather or transform, single-threaded BLAS,
        epilogue) alone: one thread synchronisation per layer. OpenBLAS splitting each
        GEMM itself meant one per GEMM (36 per Winograd layer), ruinous when the cores
        are shared, and its spinning threads stole cores from the next kernels.

        native: work's Python only calls kernels (and makes views and workspaces), doing nothing
        with what they write; then the helpers' shares are recorded here (_record) and made by
        the helpers natively, without the GIL, which a Python share waits for (threads.py).
        """
        if self._plan_steps is not None:  # recording a plan (run_network)
            if not native:
                raise NotRecordable("a layer whose Python works on what its kernels write")
            self._plan_step(work, length)
            return
        shares = self._shares(work, length)
        if len(shares) == 1:
            work(0, length)
            return
        if native and self._helpers.native:
            recorded = [self._record(share, i) for i, share in enumerate(shares) if i]
            if None not in recorded:
                self._helpers.run([shares[0], *recorded])
                return
        if deferring():  # the helpers defer kernels being built as the caller does
            shares[1:] = [functools.partial(_deferring_builds, share) for share in shares[1:]]
        self._helpers.run(shares)

    def _shares(self, work, length):
        """work's shares of [0, length): one contiguous range a thread, as many as threads (fewer where
        length is smaller), each work(lo, hi) waiting to be called."""
        parts = min(self.threads, length)
        return [functools.partial(work, length * i // parts, length * (i + 1) // parts) for i in range(parts)]

    # --- plans ------------------------------------------------------------------------------

    def run_network(self, network, net, h):
        """network(self, net, h), recorded for this network and input shape the first time into a plan (the
        kernel calls of every layer's shares, threads.Plan), and afterwards run as that plan: one native
        call for the whole forward pass, no Python between layers, the helpers spinning from one layer to
        the next. The plan keeps the activations (so only where they fit in PLAN_BYTES). Returns the
        network's output, which the next call overwrites.
        """
        key = (id(net), network.__qualname__, h.shape, h.dtype.str)
        recorded = self._plans.pop(key, None)
        if recorded is None:
            recorded = self._record_plan(network, net, h)
            if recorded is None:
                return network(self, net, h)
            if not any(k[0] == key[0] for k in self._plans):
                # A plan holds its network's prepared weights: dropped with the network (a model that has
                # prepared its weights anew, say after training), before any other network can take its id.
                weakref.finalize(net, _forget_plans, weakref.ref(self), key[0])
        self._plans[key] = recorded  # the most recently used last
        while len(self._plans) > self.PLANS_KEPT:
            del self._plans[next(iter(self._plans))]
        plan, plan_input, plan_output = recorded
        if plan is None:
            return network(self, net, h)
        np.copyto(plan_input, h)
        if self._helpers is None:
            run_plan_alone(plan)
        else:
            self._helpers.run_plan(plan)
        return plan_output

    def _record_plan(self, network, net, h):
        """(plan, its input, its output), or (None, None, None) where the network cannot be run as a
        plan (a layer with Python between its kernels, a kernel numba's JIT serves, more than PLAN_BYTES of
        activations alive at once, no spin-waits); None, to try again next time, while a kernel is being
        built.

        Recorded twice: first with every activation an array of its own, which tells from the steps that
        read or write each when it is last needed; then with each in an arena at an offset that no
        activation alive at the same time shares (first fit), so that the plan holds about what a pass
        layer by layer holds at its peak, and reuses memory still in cache as that pass does."""
        never = (None, None, None)
        if spin_waits() is None:  # (then the helpers cannot make native shares either)
            return never
        plan_input = np.empty_like(h)
        try:
            steps, activations, output = self._record_pass(network, net, plan_input)
            offsets, size = _arena_layout(steps, activations, output)
            if size > self.PLAN_BYTES:
                return never
            arena = np.empty(size, dtype=np.uint8)
            steps, placed, output = self._record_pass(network, net, plan_input, arena, offsets)
        except NotYetBuilt:
            return None
        except NotRecordable:
            return never
        if [(a.shape, a.dtype) for a in placed] != [(a.shape, a.dtype) for a in activations]:
            return never  # the network allocated otherwise the second time: not a fixed sequence of layers
        return Plan(steps), plan_input, output

    def _record_pass(self, network, net, plan_input, arena=None, offsets=None):
        """network recorded: (steps, the activations it allocated in order, its output); in `arena` at
        `offsets` where given."""
        self._plan_steps, self._plan_activations = [], []
        self._plan_arena = (arena, offsets)
        try:
            with record_calls() as pending:
                self._plan_pending = pending
                output = network(self, net, plan_input)
                self._plan_flush()
            return self._plan_steps, self._plan_activations, output
        finally:
            self._plan_steps = self._plan_pending = self._plan_activations = None
            self._plan_arena = (None, None)

    def _plan_step(self, work, length):
        """Record one _split into the plan being recorded: the caller's kernel calls since the last step
        (pad_into) as a step of its own, then a step of every thread's share of work."""
        self._plan_flush()
        step = [self._record(share, i) for i, share in enumerate(self._shares(work, length))]
        if None in step:
            raise NotRecordable("a share that cannot be made natively")
        self._plan_steps.append(step + [None] * (self.threads - len(step)))

    def _plan_flush(self):
        if self._plan_pending:
            self._plan_steps.append([NativeShare(list(self._plan_pending))] + [None] * (self.threads - 1))
            self._plan_pending.clear()

    def _new_activation(self, shape, dtype):
        """A layer's output: np.empty, or while a plan is recorded the next activation, in its arena where
        it has one (_record_plan)."""
        if self._plan_steps is None:
            return np.empty(shape, dtype=dtype)
        arena, offsets = self._plan_arena
        k = len(self._plan_activations)
        if arena is None:
            out = np.empty(shape, dtype=dtype)
        else:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            if k >= len(offsets) or offsets[k] + nbytes > arena.size:
                raise NotRecordable("a network that allocates otherwise each time")
            out = arena[offsets[k] : offsets[k] + nbytes].view(dtype).reshape(shape)
        self._plan_activations.append(out)
        return out

    def _record(self, share, i):
        """share's kernel calls, prepared here for helper i to make natively (a threads.NativeShare), with
        workspaces of that helper's own; None where a call cannot be (aot.NotRecordable)."""
        local = self._local.__dict__
        saved = local.get("spaces")
        if i:  # the caller's own share (a plan's) keeps the caller's workspaces
            local["spaces"] = self._share_spaces.setdefault(i, {})
        try:
            with record_calls() as calls:
                share()
        except NotRecordable:
            return None
        finally:
            if saved is None:
                local.pop("spaces", None)
            else:
                local["spaces"] = saved
        return NativeShare(calls)

    @contextlib.contextmanager
    def running(self):
        """Each forward pass: the calling thread on the first of thread_cpus (its own affinity restored
        afterwards), the helpers each on one of the others."""
        if self._cpus is None:
            yield
            return
        saved = os.sched_getaffinity(0)
        try:
            os.sched_setaffinity(0, {self._cpus[0]})
        except OSError:  # a CPU gone meanwhile: this pass runs free
            saved = None
        try:
            yield
        finally:
            if saved is not None:
                os.sched_setaffinity(0, saved)

    # --- layout ----------------------------------------------------------------------------

    def from_numpy(self, x):
        N, C, H, W = x.shape
        if C > 4:
            return np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # (N, H, W, C)
        # An image's few channels one at a time: 3x faster than one transposing copy, whose innermost
        # loop would be the 3 channels, a plane apart (224x224: 37 against 121 us).
        out = np.empty((N, H, W, C), dtype=x.dtype)
        for c in range(C):
            out[..., c] = x[:, c]
        return out

    def to_numpy(self, x):
        if x.ndim == 4:
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, C, H, W)
        return np.array(x)

    def prepare_conv(self, conv: FoldedConv) -> PreparedConv:
        return PreparedConv(conv)

    # The batch norm's scale is applied after the sum, so the packed weights are the model's own, reordered.
    keeps_weights = True

    def prepare_conv_bn(self, conv: ConvBatchNorm) -> PreparedConv:
        weight, dtype = conv.weight.astype(conv.dtype, copy=False), conv.dtype
        return PreparedConv(FoldedConv(weight, conv.bias.astype(dtype), conv.stride, conv.padding, conv.groups), conv.scale)

    def conv_weight(self, prepared: PreparedConv) -> np.ndarray:
        return prepared.weight()

    def _winograd_tile(self, conv: PreparedConv, N: int, P: int, Q: int) -> int:
        """The Winograd tile for this call, or 0 for the GEMM path.

        F(4x4) beats im2col from 14x14 maps up; at 7x7 and batch 1 (16 or fewer tiles)
        the transformed weights (4x or 1.8x the plain ones) cost as much as the work
        saved, so the plain GEMM is used there (per-layer timings: bench/results/notes.md).
        """
        if not conv.winograd:
            return 0
        for tile in (4, 2):
            if tile <= self.winograd_tile and N * -(-P // tile) * -(-Q // tile) >= self.MIN_TILES:
                return tile
        return 0

    def prepare_linear(self, weight, bias):
        """The fc as a 1x1 convolution of an (N, 1, 1, C) map: its GEMM packed as every convolution's."""
        return self.prepare_conv(FoldedConv(weight[:, :, None, None], bias, 1, 0, 1))

    def linear_weight(self, prepared) -> np.ndarray:
        return np.ascontiguousarray(prepared.weight()[:, :, 0, 0])

    # --- ops -------------------------------------------------------------------------------

    def _workspace(self, name, shape, dtype):
        """A scratch array reused across calls (per thread): saves page faults on every conv."""
        spaces = self._local.__dict__.setdefault("spaces", {})
        size = math.prod(shape)
        key = (name, np.dtype(dtype))
        buf = spaces.get(key)
        if buf is None or buf.size < size:
            buf = spaces[key] = np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)

    def conv(self, x, conv: PreparedConv, relu, residual=None):
        N, H, W, C = x.shape
        if C != conv.Cg * conv.G:
            raise ValueError(f"conv: input has {C} channels, the convolution expects {conv.Cg * conv.G}")
        P = conv_output_size(H, conv.R, conv.stride, conv.padding)
        Q = conv_output_size(W, conv.S, conv.stride, conv.padding)
        if P < 1 or Q < 1:
            raise ValueError(f"conv2d: input {H}x{W} is too small for a {conv.R}x{conv.S} kernel with padding {conv.padding}")
        out = self._new_activation((N, P, Q, conv.K), x.dtype)  # (N, P, Q, K)
        if residual is not None and residual.shape != out.shape:
            raise ValueError(f"conv: residual shape {residual.shape} != output shape {out.shape}")
        tile = self._winograd_tile(conv, N, P, Q)
        with DeferredBuilds() as deferred:
            if tile:
                self._conv_winograd(x, conv, relu, residual, out, tile)
            elif conv.R == conv.S == 1 and conv.padding == 0 and conv.stride == 1 and conv.G == 1:
                self._conv_1x1(x, conv, relu, residual, out)
            elif conv.G == 1:
                self._conv_direct(x, conv, relu, residual, out)
            else:
                self._conv_im2col(x, conv, relu, residual, out)
        if deferred.skipped():  # a kernel of this layer is still being built (aot.py): the NumPy reference, this once
            self._conv_numpy(x, conv, relu, residual, out)
        return out

    @staticmethod
    def _conv_numpy(x, conv: PreparedConv, relu, residual, out):
        """The layer by functional.conv2d on the NCHW view of x, scaled, biased and finished as the
        kernels finish it, into out (N, P, Q, K)."""
        y = F.conv2d(x.transpose(0, 3, 1, 2), conv.weight(), stride=conv.stride, padding=conv.padding, groups=conv.G)
        y = y.transpose(0, 2, 3, 1)  # (N, P, Q, K), a view
        np.multiply(y, conv.scale, out=out)
        out += conv.bias
        if residual is not None:
            out += residual
        if relu:
            np.maximum(out, 0, out=out)

    def _conv_winograd(self, x, conv: PreparedConv, relu, residual, out, m):
        """3x3 stride 1: each thread transforms, multiplies and finishes its own tiles (one synchronisation)."""
        N, P, Q, _ = out.shape
        A = m + 2
        T = N * ((P + m - 1) // m) * ((Q + m - 1) // m)
        U = conv.U(m)
        has_residual = residual is not None
        res = residual if has_residual else out  # a placeholder of the right type when there is none

        # Tiles a block: V and M of a block near WINOGRAD_BLOCK_BYTES, or half of U's bytes where U is larger
        # (every block reads all of U); a whole number of gemm_packed's 6-row blocks.
        block_bytes = max(self.WINOGRAD_BLOCK_BYTES, U.nbytes // 2)
        block = max(6, block_bytes // (A * A * (conv.Cg + conv.K) * x.itemsize) // 6 * 6)

        def tiles(lo, hi):
            work = self._workspace("winograd in", (2, A, A, conv.Cg), x.dtype)
            tile = self._workspace("tile", (6, U.shape[3]), x.dtype)
            tmp = self._workspace("winograd out", (m, A, conv.K), x.dtype)
            y = self._workspace("winograd y", (m, m, conv.K), x.dtype)
            for b_lo in range(lo, hi, block):
                b_hi = min(b_lo + block, hi)
                V = self._workspace("V", (A * A, b_hi - b_lo, conv.Cg), x.dtype)
                Mt = self._workspace("M", (A * A, b_hi - b_lo, conv.K), x.dtype)
                self.kernels.winograd_input(x, m, b_lo, b_hi, work, V)
                self.kernels.gemm_packed(V, U, conv.ones, conv.zeros, Mt, False, False, 0, U.shape[1], tile, Mt)
                self.kernels.winograd_output(Mt, m, conv.bias, res, has_residual, relu, b_lo, b_hi, tmp, y, out)

        self._split(tiles, T, native=True)

    def _conv_1x1(self, x, conv: PreparedConv, relu, residual, out):
        """1x1, stride 1, groups 1: the NHWC input is already the GEMM's left matrix."""
        a = x.reshape(1, -1, x.shape[3])  # (1, N*H*W, C)
        Q = out.shape[2]
        self._gemm(conv, relu, residual, out, lambda j, k: a[:, j * Q : k * Q])

    def _conv_im2col(self, x, conv: PreparedConv, relu, residual, out):
        """Grouped convolutions: NHWC patches gathered (per thread, per chunk), then the GEMMs."""
        _, P, Q, _ = out.shape
        width = conv.R * conv.S * conv.Cg

        def patches(j, k):
            cols = self._workspace("cols", (conv.G, (k - j) * Q, width), x.dtype)
            self.kernels.im2col(x, conv.R, conv.S, conv.stride, conv.padding, P, Q, j, k, cols)
            return cols

        self._gemm(conv, relu, residual, out, patches)

    def _conv_direct(self, x, conv: PreparedConv, relu, residual, out):
        """Groups 1, any kernel: conv_packed on the input padded once (an implicit GEMM, no patches)."""
        N, H, W, C = x.shape
        _, P, Q, K = out.shape
        pad = conv.padding
        xp = x
        if pad:
            xp = self._workspace("padded", (N, H + 2 * pad, W + 2 * pad, C), x.dtype)
            # On the caller alone: split between the threads, resnet50 at batch 1 ran no faster (1.003, notes.md).
            self.kernels.pad_into(x, pad, 0, N * (H + 2 * pad), xp)
        M = N * P * Q
        out2 = out.reshape(M, K)
        has_residual = residual is not None
        res2 = (residual if has_residual else out).reshape(M, K)
        panels = conv.Wp.shape[1]
        args = (conv.R, conv.stride, P, Q)

        def pixels(lo, hi):
            tile = self._workspace("tile", (6, conv.Wp.shape[3]), x.dtype)
            self.kernels.conv_packed(xp, conv.Wp, conv.scale, conv.bias, res2, has_residual, relu, *args, 6 * lo, min(6 * hi, M), 0, panels, tile, out2)

        def columns(lo, hi):
            tile = self._workspace("tile", (6, conv.Wp.shape[3]), x.dtype)
            self.kernels.conv_packed(xp, conv.Wp, conv.scale, conv.bias, res2, has_residual, relu, *args, 0, M, lo, hi, tile, out2)

        if conv.Wp.nbytes > M * conv.Wp.shape[2] * x.itemsize:
            self._split(columns, panels, native=True)  # the weights outweigh the patches: each thread reads its share
        else:
            self._split(pixels, -(-M // 6), native=True)

    def _gemm(self, conv: PreparedConv, relu, residual, out, patches):
        """out = epilogue(patches @ W), where patches(j, k) is the (G, (k-j)*Q, R*S*C/G) patch matrix
        of output rows j <= (n, p) < k. The work is split between threads by output channels where the
        weights outweigh the patches (layer4 at batch 1: each thread then reads only its share of the
        weights), else by output rows, chunk by chunk: gather, multiply, finish while still in cache.
        Groups 1 run gemm_packed (GEMM and epilogue in one pass); grouped convolutions NumPy's BLAS."""
        N, P, Q, K = out.shape
        M, G, width = N * P * Q, conv.G, conv.R * conv.S * conv.Cg
        has_residual = residual is not None
        out2 = out.reshape(M, K)
        res2 = (residual if has_residual else out).reshape(M, K)
        kernels = self.kernels
        if G == 1:
            panels = conv.Wp.shape[1]
            tile_shape = (6, conv.Wp.shape[3])
            if conv.Wp.nbytes > M * width * out.itemsize:
                a = np.ascontiguousarray(patches(0, N * P))  # (1, M, width), gathered once, read by every thread

                def columns(lo, hi):
                    tile = self._workspace("tile", tile_shape, out.dtype)
                    kernels.gemm_packed(a, conv.Wp, conv.scale, conv.bias, res2[None], has_residual, relu, lo, hi, tile, out2[None])

                self._split(columns, panels, native=True)
                return
        step = max(1, self.CHUNK_BYTES // (Q * max(G * width, K) * out.itemsize))

        def rows(lo, hi):
            for j in range(lo, hi, step):
                k = min(j + step, hi)
                span = slice(j * Q, k * Q)
                cols = patches(j, k)  # (G, (k-j)*Q, width)
                if G == 1:
                    tile = self._workspace("tile", tile_shape, out.dtype)
                    a = np.ascontiguousarray(cols)
                    kernels.gemm_packed(a, conv.Wp, conv.scale, conv.bias, res2[None, span], has_residual, relu, 0, panels, tile, out2[None, span])
                    continue
                src = self._workspace("gemm", (G, (k - j) * Q, K // G), out.dtype)
                np.matmul(cols, conv.W, out=src)
                kernels.epilogue(src, conv.scale, conv.bias, res2[span], has_residual, relu, out2[span])

        if G == 1:
            self._split(rows, N * P, native=True)
            return
        with _single_threaded_blas():
            self._split(rows, N * P)

    def max_pool(self, x):
        N, H, W, C = x.shape
        out = self._new_activation((N, conv_output_size(H, 3, 2, 1), conv_output_size(W, 3, 2, 1), C), x.dtype)
        with DeferredBuilds() as deferred:
            self._split(lambda lo, hi: self.kernels.max_pool_3x3s2(x, lo, hi, out), N * out.shape[1], native=True)
        if deferred.skipped():  # the kernel is still being built (aot.py): the NumPy reference, this once
            out[...] = F.max_pool2d(x.transpose(0, 3, 1, 2), 3, 2, 1).transpose(0, 2, 3, 1)
        return out

    def global_avg_pool(self, x):
        N, _, _, C = x.shape
        out = self._new_activation((N, C), x.dtype)
        with DeferredBuilds() as deferred:
            self._split(lambda lo, hi: self.kernels.mean_pool(x, lo, hi, out), N, native=True)
        if deferred.skipped():  # the kernel is still being built (aot.py): NumPy's mean, this once
            np.mean(x, axis=(1, 2), out=out)
        return out  # (N, C)

    def linear(self, x, fc):
        """The fc as a 1x1 convolution (_conv_1x1): where its weights outweigh the images (always at
        small batches), each thread computes its own output features, streaming its share of the weights."""
        N, C = x.shape
        return self.conv(x.reshape(N, 1, 1, C), fc, relu=False).reshape(N, fc.K)


def _forget_plans(backend_ref, net_id: int) -> None:
    """Drop a collected network's plans (weakref.finalize of run_network)."""
    backend = backend_ref()
    if backend is not None:
        for key in [k for k in backend._plans if k[0] == net_id]:
            del backend._plans[key]


def _alive(steps, activations, output) -> list[tuple[int, int]]:
    """(first, last) step of each activation of a recorded plan: from the first step whose calls refer to
    it (through any view) to the last; the output (each, where a tuple) to the end (len(steps)); one no
    call refers to (len(steps), -1)."""
    index = {id(a): k for k, a in enumerate(activations)}
    spans = [[len(steps), -1] for _ in activations]
    for s, step in enumerate(steps):
        for share in step:
            for _, _, args in share.calls if share is not None else ():
                for arg in args:
                    k = index.get(id(_root(arg)))
                    if k is not None:
                        spans[k] = [min(spans[k][0], s), max(spans[k][1], s)]
    for out in output if isinstance(output, tuple) else (output,):
        k = index.get(id(_root(out)))
        if k is not None:
            spans[k][1] = len(steps)
    return [tuple(span) for span in spans]


def _root(a):
    """The array a view is of (a itself if it is none's)."""
    while isinstance(a, np.ndarray) and isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _arena_layout(steps, activations, output) -> tuple[list[int], int]:
    """Byte offsets in one arena for the activations of a recorded plan, and the arena's size: each
    activation shares no byte with another alive at any same step (_alive); first fit, in order of
    allocation, 64-byte aligned."""
    first, last = zip(*_alive(steps, activations, output)) if activations else ((), ())
    offsets, placed, size = [], [], 0  # placed: (offset, end, last step) of those given a place
    for k, a in enumerate(activations):
        alive = sorted((o, e) for o, e, l in placed if l >= first[k])
        nbytes = -(-a.nbytes // 64) * 64
        offset = 0
        for o, e in alive:
            if offset + nbytes <= o:
                break
            offset = max(offset, e)
        offsets.append(offset)
        placed.append((offset, offset + nbytes, last[k]))
        size = max(size, offset + nbytes)
    return offsets, size


def _deferring_builds(share):
    """A helper's Python share of a deferring caller, deferring kernels being built as the caller does."""
    with DeferredBuilds():
        share()


# --- BLAS thread count ---------------------------------------------------------------------------


def _find_openblas():
    """(set_num_threads, get_num_threads) of the OpenBLAS NumPy loaded, if any (found as threadpoolctl does)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    return setter, getter
    return None


@functools.lru_cache(maxsize=None)
def _openblas():
    """_find_openblas, once per process (first asked for by compile_kernels)."""
    return _find_openblas()


@contextlib.contextmanager
def _single_threaded_blas():
    """BLAS on one thread for the duration (the backend splits GEMMs itself), then as the user had it."""
    if _openblas() is None:
        yield
        return
    setter, getter = _openblas()
    before = getter()
    setter(ctypes.c_int(1))
    try:
        yield
    finally:
        setter(ctypes.c_int(before))


register_backend("numba", NumbaBackend)
