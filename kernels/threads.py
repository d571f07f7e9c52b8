"""The numba backend's helper threads: each layer's shares handed over without a wake-up.

``NumbaBackend._split`` cuts each layer into one share per thread; the caller runs the first, each
helper thread one of the others. A thread blocked in the kernel (a futex) took 60-150 us to start
after its share was handed over on the 2-vCPU machine, and the caller as long again to wake when the
helper finished: about 150 us a layer, 10-20% of a batch-1 forward (bench/results/notes.md). So here
a helper that has finished its share keeps waiting for the next by spinning, with the GIL released
(a few lines of LLVM IR, ``_SPIN_IR``, called through ctypes), for about SPIN_SECONDS before it
sleeps; and the caller waits for the helpers' shares the same way.

Spinning alone was not enough: once it sees its share, a helper needs the GIL for the Python around
the share's kernels, and the caller, which posted the share a moment before, still holds it, so the
helper blocked on the GIL instead, and paid the same wake-up. So a helper also waits (still spinning,
GIL released) until the caller has entered a kernel (``aot.KERNEL_ENTRIES`` counts kernel calls) and
so let go of the GIL, and only then takes it.

A helper or caller that has spun for SPIN_SECONDS sleeps on a condition, and whoever posts a share or
finishes one wakes it: an idle model costs no CPU. Where the IR cannot be compiled (llvmlite's JIT
missing for this platform), both wait on the condition only, as a thread pool would.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
import time
import weakref

import numpy as np

from . import aot

# How long a thread spins for the next share (or the end of the others') before it sleeps: longer
# than the gaps between a forward pass's layers (50-200 us of Python), short enough that an idle
# model stops using CPU at once.
SPIN_SECONDS = 0.002
# How long a helper that has seen its share waits for the caller to enter a kernel: the caller posts the
# shares just before running its own, whose Python reaches its first kernel within tens of microseconds.
GIL_SPIN_SECONDS = 100e-6
# And then a little longer, so as to take the GIL once it is free (waiting for it, a thread sleeps, and
# pays the wake-up this module avoids): the caller counts its kernel call a few microseconds before ctypes
# lets go of the GIL (it converts the arguments first), and a helper marks its share done a few before it
# calls its next spin-wait. 2 us: a helper started 52-78 us (median) after the handover and the caller
# waited 118-137 us a layer at the end; 10 us: 31-32 and 66-76 (resnet50 batch 1, bench/results/notes.md).
SETTLE_SECONDS = 10e-6

# flags[slot * _STRIDE + field] of each helper, one cache line (64 bytes) apart
_STRIDE = 8
_POSTED, _DONE, _ENTRIES_AT_POST, _SLEEPING = 0, 1, 2, 3
# _spin_wait's outcomes
_TIMED_OUT, _READY = 0, 1


def _spin_ir() -> str:
    """Two spin-waits (i64 loads with acquire ordering; x86's pause or Arm's yield between them).

    wait_for_share(flags, entries, posted, seen, entries_at_post, spins, gil_spins, settle): until
    flags[posted] > seen (else after `spins` turns: 0); then until entries[0] > flags[entries_at_post]
    (the caller has entered a kernel) or `gil_spins` more turns (a share of Python and NumPy only, or
    numba dispatchers, counts no entry); then `settle` turns more (the caller's kernel call lets go of
    the GIL a few instructions after counting itself): 1.
    wait_until(flags, index, target, spins, settle): until flags[index] >= target, then `settle` turns more
    (1); or 0 after `spins` turns.
    """
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        pause, declare = "call void @llvm.x86.sse2.pause()", "declare void @llvm.x86.sse2.pause()"
    elif machine in ("aarch64", "arm64"):
        pause, declare = "call void @llvm.aarch64.hint(i32 1)", "declare void @llvm.aarch64.hint(i32)"
    else:
        pause, declare = "", ""
    return f"""
{declare}

define i64 @npresnet_wait_until(i64* %flags, i64 %index, i64 %target, i64 %spins, i64 %settle) {{
entry:
  %p = getelementptr i64, i64* %flags, i64 %index
  br label %loop
loop:
  %i = phi i64 [0, %entry], [%next, %again]
  %v = load atomic i64, i64* %p acquire, align 8
  %done = icmp sge i64 %v, %target
  br i1 %done, label %yes, label %again
again:
  {pause}
  %next = add i64 %i, 1
  %more = icmp slt i64 %next, %spins
  br i1 %more, label %loop, label %no
yes:
  %k = phi i64 [0, %loop], [%k1, %settling]
  %left = icmp slt i64 %k, %settle
  br i1 %left, label %settling, label %met
settling:
  {pause}
  %k1 = add i64 %k, 1
  br label %yes
met:
  ret i64 1
no:
  ret i64 0
}}

define i64 @npresnet_wait_for_share(i64* %flags, i64* %entries, i64 %posted, i64 %seen, i64 %at_post, i64 %spins, i64 %gil_spins, i64 %settle) {{
entry:
  %next = add i64 %seen, 1
  %shared = call i64 @npresnet_wait_until(i64* %flags, i64 %posted, i64 %next, i64 %spins, i64 0)
  %got = icmp ne i64 %shared, 0
  br i1 %got, label %gil, label %timed_out
gil:
  %pa = getelementptr i64, i64* %flags, i64 %at_post
  %base = load atomic i64, i64* %pa acquire, align 8
  %entered = add i64 %base, 1
  %in_kernel = call i64 @npresnet_wait_until(i64* %entries, i64 0, i64 %entered, i64 %gil_spins, i64 0)
  %never = call i64 @npresnet_wait_until(i64* %flags, i64 %posted, i64 9223372036854775807, i64 %settle, i64 0)
  ret i64 1
timed_out:
  ret i64 0
}}
"""


class _SpinWaits:
    """The compiled spin-waits and how many turns of them last SPIN_SECONDS (measured once)."""

    def __init__(self):
        addresses = aot.compile_ir(_spin_ir(), ["npresnet_wait_until", "npresnet_wait_for_share"])
        i64, pointer = ctypes.c_int64, ctypes.c_void_p
        # ctypes.CFUNCTYPE lets go of the GIL for the call
        self.wait_until = ctypes.CFUNCTYPE(i64, pointer, i64, i64, i64, i64)(addresses["npresnet_wait_until"])
        self.wait_for_share = ctypes.CFUNCTYPE(i64, pointer, pointer, i64, i64, i64, i64, i64, i64)(addresses["npresnet_wait_for_share"])
        never = np.zeros(1, dtype=np.int64)
        turns = 20000
        start = time.perf_counter()
        self.wait_until(never.ctypes.data, 0, 1, turns, 0)  # never met: `turns` pauses
        per_turn = max(time.perf_counter() - start, 1e-6) / turns
        self.spins = max(1000, int(SPIN_SECONDS / per_turn))
        self.gil_spins = max(100, int(GIL_SPIN_SECONDS / per_turn))
        self.settle = max(10, int(SETTLE_SECONDS / per_turn))


_spin_waits: _SpinWaits | None = None
_spin_waits_lock = threading.Lock()


def spin_waits() -> _SpinWaits | None:
    """The spin-waits of this process, compiled at first use; None where they cannot be."""
    global _spin_waits
    with _spin_waits_lock:
        if _spin_waits is None:
            try:
                _spin_waits = _SpinWaits()
            except Exception as exc:  # no JIT for this platform, IR llvmlite rejects: sleep-only waits
                logging.getLogger("npresnet").debug("npresnet: no spin-waits (%s: %s)", type(exc).__name__, exc)
                _spin_waits = False
        return _spin_waits or None


class Helpers:
    """`count` helper threads (each pinned to cpus[i] where given) that run shares of the caller's work.

    run(shares) runs shares[0] on the calling thread and shares[1:] on helpers 0, 1, ..., and
    returns when all have ended (raising the first exception of any). One caller at a time.
    The threads end when the Helpers object is collected (or close() is called).
    """

    def __init__(self, count: int, cpus: list[int] | None = None):
        self.count = count
        self._waits = spin_waits()
        self._flags = np.zeros((count + 1) * _STRIDE, dtype=np.int64)
        self._address = self._flags.ctypes.data  # read once: .ctypes builds an object on every access
        self._state = _State(count)
        self._threads = [
            threading.Thread(target=_helper, args=(self._state, self._flags, self._waits, i, cpus[i] if cpus else None),
                             name=f"npresnet-helper-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()
        weakref.finalize(self, _State.close, self._state)

    def close(self) -> None:
        self._state.close()

    def run(self, shares) -> None:
        state, flags, waits = self._state, self._flags, self._waits
        helpers = len(shares) - 1
        if helpers > self.count:
            raise ValueError(f"{len(shares)} shares for the caller and {self.count} helpers")
        state.generation += 1
        generation = state.generation
        for i in range(helpers):
            state.shares[i] = shares[i + 1]
            base = i * _STRIDE
            flags[base + _ENTRIES_AT_POST] = aot.KERNEL_ENTRIES[0]
            flags[base + _POSTED] = generation
            if flags[base + _SLEEPING]:
                with state.condition:
                    state.condition.notify_all()
        try:
            shares[0]()
        finally:  # every share has ended before this returns or raises: none writes on behind the caller
            for i in range(helpers):
                done = i * _STRIDE + _DONE
                if flags[done] >= generation:
                    continue
                # settle: the helper counts its share done just before it lets go of the GIL
                if waits is not None and waits.wait_until(self._address, done, generation, waits.spins, waits.settle):
                    continue
                with state.condition:
                    flags[self.count * _STRIDE + _SLEEPING] = 1  # the caller's slot
                    while flags[done] < generation:
                        state.condition.wait()
                    flags[self.count * _STRIDE + _SLEEPING] = 0
        errors = [e for e in state.errors[:helpers] if e is not None]
        state.errors[:helpers] = [None] * helpers
        if errors:
            raise errors[0]


class _State:
    """What the caller and its helpers share, apart from the flags (no reference to the Helpers
    object, so that a helper thread does not keep it alive)."""

    def __init__(self, count: int):
        self.shares = [None] * count
        self.errors = [None] * count
        self.condition = threading.Condition()
        self.generation = 0
        self.closed = False

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify_all()


def _helper(state: _State, flags: np.ndarray, waits: _SpinWaits | None, i: int, cpu: int | None) -> None:
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:  # a CPU gone meanwhile: the thread stays free
            pass
    base = i * _STRIDE
    caller_sleeping = (len(flags) // _STRIDE - 1) * _STRIDE + _SLEEPING
    seen = 0
    address = flags.ctypes.data
    entries = aot.KERNEL_ENTRIES.ctypes.data
    while True:
        ready = waits is not None and waits.wait_for_share(
            address, entries, base + _POSTED, seen, base + _ENTRIES_AT_POST, waits.spins, waits.gil_spins, waits.settle
        )
        if not ready:
            with state.condition:
                flags[base + _SLEEPING] = 1
                while flags[base + _POSTED] <= seen and not state.closed:
                    state.condition.wait()
                flags[base + _SLEEPING] = 0
        if state.closed:
            return
        seen = int(flags[base + _POSTED])
        share, state.shares[i] = state.shares[i], None
        try:
            share()
        except BaseException as exc:  # the caller raises it
            state.errors[i] = exc
        del share
        flags[base + _DONE] = seen
        if flags[caller_sleeping]:
            with state.condition:
                state.condition.notify_all()
