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

Native shares: taking the GIL still cost a layer about 30 us (the helper started 25 us after the
handover, the caller resumed 13 us after the helper's end: bench/results/notes.md). So a share whose
Python only calls kernels is recorded by the caller instead (aot.record_calls: each call prepared as a
slots function and its arguments in int64 slots) and posted as a NativeShare, whose calls the helper
makes from its native loop (``serve``) without ever taking the GIL: 13 us a layer instead of 30.

Plans: a whole forward pass recorded once (cpu.py's run_network), every thread's share of every
layer, and run by ``run_plan`` in one native call: the caller posts each step's shares, makes its own,
waits for the helpers' and goes on to the next step, no Python in between; the helpers spin on through
the whole plan (_PLAN_RUNNING) instead of falling asleep when a step leaves them idle longer than
SPIN_SECONDS.
"""
from __future__ import annotations

import ctypes
import logging
from array import array as _slots_array
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

# flags[slot * _STRIDE + field] of each helper, one cache line (64 bytes) apart. _CALLS: the address of a
# native share's table (NativeShare), 0 for a Python share; _STATUS: the first failed call's status.
_STRIDE = 8
_POSTED, _DONE, _ENTRIES_AT_POST, _SLEEPING, _CALLS, _STATUS = 0, 1, 2, 3, 4, 5
# In the caller's slot: set while a plan runs (Helpers.run_plan), when a helper that has spun idle spins on.
_PLAN_RUNNING = 6
# _spin_wait's outcomes
_TIMED_OUT, _READY = 0, 1


def _spin_ir() -> str:
    """A helper's loop and two spin-waits (i64 loads with acquire ordering; x86's pause or Arm's yield
    between them).

    serve(flags, entries, base, seen, spins, gil_spins, settle), a helper's loop, its fields at
    flags[base:]: wait until flags[posted] > seen (else after `spins` turns: 0). A native share (its
    table's address at flags[calls]): make its calls, one after the other, each f(slots) (the first
    failure's status into flags[status], the rest not made), set flags[done] to the share's number, and
    wait for the next. A Python share: wait_for_gil, then 1 (the Python side runs it).
    helper_share(plan, row, h): the table of helper h's share in the plan's step whose caller's is at plan[row].
    make_calls(table): a NativeShare's calls in order (0, or the first failure's status; a table at
    address 0 has none).
    run_plan(flags, plan, helpers, generation): a Plan's steps in turn, step s numbered generation + s + 1:
    post each helper's share of it (calls, then posted), make the caller's, wait until each posted
    helper's done reaches the number; the caller's first failure's status (a helper's in its flags).
    wait_for_gil(flags, entries, posted, entries_at_post, gil_spins, settle): until entries[0] >
    flags[entries_at_post] (the caller has entered a kernel, and so let go of the GIL) or `gil_spins`
    turns (a share of Python and NumPy only, or numba dispatchers, counts no entry); then `settle` turns
    more (the caller's kernel call lets go of the GIL a few instructions after counting itself).
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

define i64 @npresnet_serve(i64* %flags, i64* %entries, i64 %base, i64 %seen, i64 %spins, i64 %gil_spins, i64 %settle) {{
entry:
  %calls_at = add i64 %base, {_CALLS}
  %done_at = add i64 %base, {_DONE}
  %status_at = add i64 %base, {_STATUS}
  %pp = getelementptr i64, i64* %flags, i64 %base
  br label %wait
wait:
  %s = phi i64 [%seen, %entry], [%posted, %finished]
  %next = add i64 %s, 1
  %got = call i64 @npresnet_wait_until(i64* %flags, i64 %base, i64 %next, i64 %spins, i64 0)
  %shared = icmp ne i64 %got, 0
  br i1 %shared, label %share, label %timed_out
share:
  %posted = load atomic i64, i64* %pp acquire, align 8
  %cp = getelementptr i64, i64* %flags, i64 %calls_at
  %table_address = load atomic i64, i64* %cp acquire, align 8
  %native = icmp ne i64 %table_address, 0
  br i1 %native, label %run, label %python
run:
  %status = call i64 @npresnet_make_calls(i64 %table_address)
  %ok = icmp eq i64 %status, 0
  br i1 %ok, label %finished, label %failed
failed:
  %stp = getelementptr i64, i64* %flags, i64 %status_at
  store i64 %status, i64* %stp
  br label %finished
finished:
  %dp = getelementptr i64, i64* %flags, i64 %done_at
  store atomic i64 %posted, i64* %dp release, align 8
  br label %wait
python:
  %at_post = add i64 %base, {_ENTRIES_AT_POST}
  %ready = call i64 @npresnet_wait_for_gil(i64* %flags, i64* %entries, i64 %base, i64 %at_post, i64 %gil_spins, i64 %settle)
  ret i64 1
timed_out:
  ret i64 0
}}

define i64 @npresnet_make_calls(i64 %table_address) {{
entry:
  %none = icmp eq i64 %table_address, 0
  br i1 %none, label %done, label %start
start:
  %table = inttoptr i64 %table_address to i64*
  %n = load i64, i64* %table
  br label %calls
calls:
  %j = phi i64 [0, %start], [%j1, %call]
  %more = icmp slt i64 %j, %n
  br i1 %more, label %call, label %done
call:
  %j2 = shl i64 %j, 1
  %fi = add i64 %j2, 1
  %si = add i64 %j2, 2
  %fp = getelementptr i64, i64* %table, i64 %fi
  %sp = getelementptr i64, i64* %table, i64 %si
  %f = load i64, i64* %fp
  %slots_address = load i64, i64* %sp
  %function = inttoptr i64 %f to i32 (i64*)*
  %slots = inttoptr i64 %slots_address to i64*
  %status = call i32 %function(i64* %slots)
  %j1 = add i64 %j, 1
  %ok0 = icmp eq i32 %status, 0
  %ok2 = icmp eq i32 %status, -2
  %ok = or i1 %ok0, %ok2
  br i1 %ok, label %calls, label %failed
failed:
  %status64 = sext i32 %status to i64
  ret i64 %status64
done:
  ret i64 0
}}

define i64 @npresnet_helper_share(i64* %plan, i64 %row, i64 %h) {{
entry:
  %caller = add i64 %row, %h
  %i = add i64 %caller, 1
  %p = getelementptr i64, i64* %plan, i64 %i
  %t = load i64, i64* %p
  ret i64 %t
}}

define i64 @npresnet_run_plan(i64* %flags, i64 %plan_address, i64 %helpers, i64 %generation) {{
entry:
  %plan = inttoptr i64 %plan_address to i64*
  %steps = load i64, i64* %plan
  %threads = add i64 %helpers, 1
  br label %step
step:
  %s = phi i64 [0, %entry], [%s1, %waited]
  %status = phi i64 [0, %entry], [%status2, %waited]
  %more = icmp slt i64 %s, %steps
  br i1 %more, label %post, label %end
post:
  %row0 = mul i64 %s, %threads
  %row = add i64 %row0, 1
  %s1 = add i64 %s, 1
  %gen = add i64 %generation, %s1
  br label %posting
posting:
  %h = phi i64 [0, %post], [%h1, %posted]
  %more_helpers = icmp slt i64 %h, %helpers
  br i1 %more_helpers, label %post_one, label %mine
post_one:
  %t = call i64 @npresnet_helper_share(i64* %plan, i64 %row, i64 %h)
  %h1 = add i64 %h, 1
  %has = icmp ne i64 %t, 0
  br i1 %has, label %do_post, label %posted
do_post:
  %base = mul i64 %h, {_STRIDE}
  %ci = add i64 %base, {_CALLS}
  %cp = getelementptr i64, i64* %flags, i64 %ci
  store atomic i64 %t, i64* %cp release, align 8
  %pp = getelementptr i64, i64* %flags, i64 %base
  store atomic i64 %gen, i64* %pp release, align 8
  br label %posted
posted:
  br label %posting
mine:
  %mp = getelementptr i64, i64* %plan, i64 %row
  %m = load i64, i64* %mp
  %mine_status = call i64 @npresnet_make_calls(i64 %m)
  br label %waiting
waiting:
  %w = phi i64 [0, %mine], [%w1, %waited_one]
  %more_waits = icmp slt i64 %w, %helpers
  br i1 %more_waits, label %wait_one, label %waited
wait_one:
  %wt = call i64 @npresnet_helper_share(i64* %plan, i64 %row, i64 %w)
  %w1 = add i64 %w, 1
  %whas = icmp ne i64 %wt, 0
  br i1 %whas, label %spin, label %waited_one
spin:
  %wbase = mul i64 %w, {_STRIDE}
  %di = add i64 %wbase, {_DONE}
  %forever = call i64 @npresnet_wait_until(i64* %flags, i64 %di, i64 %gen, i64 9223372036854775807, i64 0)
  br label %waited_one
waited_one:
  br label %waiting
waited:
  %first = icmp eq i64 %status, 0
  %status2 = select i1 %first, i64 %mine_status, i64 %status
  br label %step
end:
  ret i64 %status
}}

define i64 @npresnet_wait_for_gil(i64* %flags, i64* %entries, i64 %posted, i64 %at_post, i64 %gil_spins, i64 %settle) {{
entry:
  %pa = getelementptr i64, i64* %flags, i64 %at_post
  %base = load atomic i64, i64* %pa acquire, align 8
  %entered = add i64 %base, 1
  %in_kernel = call i64 @npresnet_wait_until(i64* %entries, i64 0, i64 %entered, i64 %gil_spins, i64 0)
  %never = call i64 @npresnet_wait_until(i64* %flags, i64 %posted, i64 9223372036854775807, i64 %settle, i64 0)
  ret i64 1
}}
"""


class _SpinWaits:
    """The compiled spin-waits and how many turns of them last SPIN_SECONDS (measured once)."""

    def __init__(self):
        addresses = aot.compile_ir(_spin_ir(), ["npresnet_wait_until", "npresnet_serve", "npresnet_run_plan"])
        i64, pointer = ctypes.c_int64, ctypes.c_void_p
        # ctypes.CFUNCTYPE lets go of the GIL for the call
        self.wait_until = ctypes.CFUNCTYPE(i64, pointer, i64, i64, i64, i64)(addresses["npresnet_wait_until"])
        self.serve = ctypes.CFUNCTYPE(i64, pointer, pointer, i64, i64, i64, i64, i64)(addresses["npresnet_serve"])
        self.run_plan = ctypes.CFUNCTYPE(i64, pointer, i64, i64, i64)(addresses["npresnet_run_plan"])
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


class NativeShare:
    """A share as kernel calls prepared for a helper to make natively, without the GIL (aot.record_calls):
    its table, [n, slots function, slots address, ...] as int64, holds each call's function and slots,
    and the share keeps the calls (their arrays) alive until it has run."""

    def __init__(self, calls: list):
        self.calls = calls
        self.table = _slots_array("q", [len(calls)])
        for function, slots, _ in calls:
            self.table.extend((function, slots.buffer_info()[0]))
        self.address = self.table.buffer_info()[0]


class Helpers:
    """`count` helper threads (each pinned to cpus[i] where given) that run shares of the caller's work.

    run(shares) runs shares[0] on the calling thread and shares[1:] on helpers 0, 1, ..., and
    returns when all have ended (raising the first exception of any). A share is a callable, which the
    helper runs in Python (taking the GIL), or, where `native` (the spin-waits compiled), a NativeShare,
    whose calls the helper makes in its native loop (serve) as soon as it sees it. One caller at a time.
    The threads end when the Helpers object is collected (or close() is called).
    """

    def __init__(self, count: int, cpus: list[int] | None = None):
        self.count = count
        self._waits = spin_waits()
        self.native = self._waits is not None
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
            share = state.shares[i] = shares[i + 1]
            base = i * _STRIDE
            flags[base + _CALLS] = share.address if isinstance(share, NativeShare) else 0
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
                native = flags[i * _STRIDE + _CALLS]
                # settle: a Python share's helper counts it done just before it lets go of the GIL
                if waits is not None and waits.wait_until(self._address, done, generation, waits.spins, 0 if native else waits.settle):
                    continue
                if native:  # a native share, whose end wakes no one: look every 0.1 ms
                    while flags[done] < generation:
                        time.sleep(1e-4)
                    continue
                with state.condition:
                    flags[self.count * _STRIDE + _SLEEPING] = 1  # the caller's slot
                    while flags[done] < generation:
                        state.condition.wait()
                    flags[self.count * _STRIDE + _SLEEPING] = 0
        for i in range(helpers):
            status = flags[i * _STRIDE + _STATUS]
            if status:
                flags[i * _STRIDE + _STATUS] = 0
                state.errors[i] = _status_error(status, "a helper's")
            if isinstance(state.shares[i], NativeShare):
                state.shares[i] = None  # its arrays, no longer needed
        errors = [e for e in state.errors[:helpers] if e is not None]
        state.errors[:helpers] = [None] * helpers
        if errors:
            raise errors[0]

    def run_plan(self, plan: Plan) -> None:
        """Make a plan's steps (Plan), the caller's shares here, helper i's on helper i, in one native call:
        the helpers spin on between steps (none falls asleep meanwhile) and are woken first if asleep."""
        state, flags, waits = self._state, self._flags, self._waits
        if waits is None:
            raise ValueError("plans need the compiled spin-waits")
        if plan.threads != self.count + 1:
            raise ValueError(f"a plan for {plan.threads} threads, run by {self.count + 1}")
        running = self.count * _STRIDE + _PLAN_RUNNING
        with state.condition:  # a helper about to sleep sees this set, or is woken
            flags[running] = 1
            state.condition.notify_all()
        try:
            status = waits.run_plan(self._address, plan.address, self.count, state.generation)
        finally:
            state.generation += len(plan.steps)
            flags[running] = 0
        for i in range(self.count):
            if flags[i * _STRIDE + _STATUS]:
                status = status or int(flags[i * _STRIDE + _STATUS])
                flags[i * _STRIDE + _STATUS] = 0
        _raise_status(status, "a plan's")


class Plan:
    """Steps of native calls that the caller and its helpers make in turn, every thread its own share of a
    step, each step begun once all of the one before have ended: a whole forward pass in one native call
    (Helpers.run_plan), with no Python between its layers. steps: for each step, one NativeShare or None
    (no share) per thread, the caller's first. The Plan keeps the shares, and so their arrays, alive."""

    def __init__(self, steps: list[list]):
        self.steps = steps
        threads = len(steps[0]) if steps else 1
        self.threads = threads
        self.table = _slots_array("q", [len(steps)])
        for step in steps:
            if len(step) != threads:
                raise ValueError(f"a plan step of {len(step)} shares, not {threads}")
            self.table.extend(share.address if share is not None else 0 for share in step)
        self.address = self.table.buffer_info()[0]


def run_plan_alone(plan: Plan) -> None:
    """A one-thread plan, made on the calling thread (natively, the GIL released)."""
    waits = spin_waits()
    if waits is None or plan.threads != 1:
        raise ValueError("a plan of one thread needs the compiled spin-waits")
    flags = np.zeros(_STRIDE, dtype=np.int64)
    _raise_status(waits.run_plan(flags.ctypes.data, plan.address, 0, 0), "the caller's")


def _status_error(status: int, whose: str) -> RuntimeError:
    return RuntimeError(f"npresnet: a kernel of {whose} share failed (numba status {status})")


def _raise_status(status: int, whose: str) -> None:
    if status:
        raise _status_error(status, whose)


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
    plan_running = (len(flags) // _STRIDE - 1) * _STRIDE + _PLAN_RUNNING
    seen = 0
    address = flags.ctypes.data
    entries = aot.KERNEL_ENTRIES.ctypes.data
    while True:
        ready = False
        if waits is not None:
            # Native shares run inside serve; it returns for a Python share (1) or after spinning idle (0).
            ready = waits.serve(address, entries, base, seen, waits.spins, waits.gil_spins, waits.settle)
            seen = max(seen, int(flags[base + _DONE]))
        if not ready:
            if flags[plan_running] and waits is not None:
                continue  # a plan's next step is on its way: spin on
            with state.condition:
                flags[base + _SLEEPING] = 1
                while flags[base + _POSTED] <= seen and not state.closed and not flags[plan_running]:
                    state.condition.wait()
                flags[base + _SLEEPING] = 0
            if state.closed:
                return
            if flags[base + _POSTED] <= seen or flags[base + _CALLS]:
                continue  # woken for a plan, whose steps serve waits for, or a native share, which it makes
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
