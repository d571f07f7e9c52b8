"""Wall time and peak memory of a command and all its descendants (e.g. the test suite).

    python bench/suite_memory.py [--interval 0.2] [--log FILE] [--top 10] -- python -m pytest -q

Polls /proc every `interval` seconds for the summed resident set size (VmRSS) of the command's process
tree (the pytest process, the subprocesses tests start, their children), and prints the peak and the
wall time on stderr when the command ends; with --log, one line per poll (seconds, RSS MiB, PSS MiB,
process count).
With --top N it also loads itself into pytest as a plugin (PYTEST_PLUGINS), which notes when each test
starts, and names the N tests during which the tree's memory peaked highest. Summed RSS counts pages
shared between processes (the libraries every Python maps, a browser's processes) once per process: a
safe upper bound. The peak of the summed PSS (shared pages split between their processes) is printed
too: what the processes really hold together. Linux only.
"""
import argparse
import os
import subprocess
import sys
import time

EVENTS_VARIABLE = "SUITE_MEMORY_EVENTS"  # where the pytest plugin appends "time nodeid" at each test's start


def children_of() -> dict:
    """Parent pid -> list of child pids, for every process visible in /proc."""
    tree = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: the fields after the last ')' are fixed.
        fields = stat[stat.rfind(")") + 2:].split()
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def memory_kib(pid: int, path: str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0  # gone, or a zombie (no such line)


def tree_memory(root: int) -> tuple:
    """(summed RSS, summed PSS, both in KiB, process count) of `root` and all its descendants."""
    tree = children_of()
    pending, rss, pss, count = [root], 0, 0, 0
    while pending:
        pid = pending.pop()
        rss += memory_kib(pid, "status", "VmRSS:")
        pss += memory_kib(pid, "smaps_rollup", "Pss:")
        count += 1
        pending.extend(tree.get(pid, ()))
    return rss, pss, count


# --- the pytest plugin (PYTEST_PLUGINS=suite_memory, with this folder on PYTHONPATH) -----------------


_events = None  # the plugin's open events file, in the pytest process the sampler started


def pytest_configure(config):
    global _events
    path = os.environ.pop(EVENTS_VARIABLE, None)  # popped: pytest runs that tests start note nothing
    if path:
        _events = open(path, "a", buffering=1)


def pytest_unconfigure(config):
    if _events:
        _events.close()


def pytest_runtest_logstart(nodeid, location):
    if _events:
        _events.write(f"{time.time():.3f} {nodeid}\n")


def peaks_by_test(samples, events_path, top):
    """The `top` tests with the highest tree RSS sampled while they ran: [(MiB, nodeid)]."""
    with open(events_path) as f:
        events = [line.rstrip("\n").split(" ", 1) for line in f if " " in line]
    starts = [(float(t), nodeid) for t, nodeid in events]
    peaks = {}
    i = -1
    for when, kib in samples:
        while i + 1 < len(starts) and starts[i + 1][0] <= when:
            i += 1
        if i >= 0:
            nodeid = starts[i][1]
            peaks[nodeid] = max(peaks.get(nodeid, 0), kib)
    return sorted(((kib / 1024, nodeid) for nodeid, kib in peaks.items()), reverse=True)[:top]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between polls (default 0.2)")
    parser.add_argument("--log", help="write 'seconds MiB processes' per poll to this file")
    parser.add_argument("--top", type=int, default=0, help="name the N tests during which memory peaked (pytest only)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    log = open(args.log, "w") if args.log else None
    env = dict(os.environ)
    events_path = None
    if args.top:
        here = os.path.dirname(os.path.abspath(__file__))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        env["PYTEST_PLUGINS"] = ",".join(p for p in (env.get("PYTEST_PLUGINS"), "suite_memory") if p)
        events_path = f"/tmp/suite_memory_events.{os.getpid()}"
        open(events_path, "w").close()
        env[EVENTS_VARIABLE] = events_path
    samples = []
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    peak, peak_at, peak_pss = 0, 0.0, 0
    while process.poll() is None:
        total, pss, count = tree_memory(process.pid)
        now = time.perf_counter() - start
        if total > peak:
            peak, peak_at = total, now
        peak_pss = max(peak_pss, pss)
        samples.append((time.time(), total))
        if log:
            log.write(f"{now:.1f} {total / 1024:.0f} {pss / 1024:.0f} {count}\n")
        time.sleep(args.interval)
    wall = time.perf_counter() - start
    if log:
        log.close()
    print(f"suite_memory: wall {wall:.1f} s, peak RSS {peak / 1024 ** 2:.2f} GiB "
          f"({peak / 1024:.0f} MiB) at {peak_at:.0f} s, peak PSS {peak_pss / 1024 ** 2:.2f} GiB, "
          f"exit status {process.returncode}", file=sys.stderr)
    if events_path:
        for mib, nodeid in peaks_by_test(samples, events_path, args.top):
            print(f"suite_memory: {mib:7.0f} MiB  {nodeid}", file=sys.stderr)
        os.remove(events_path)
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
