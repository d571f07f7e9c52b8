"""``python -m fuzz --cases 5000 --seed 1``: the long fuzz run over every format; exits 1 on any failure."""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

from . import run_cases, summary
from .cases import hostile, mutate, seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    parser.add_argument("--cases", type=int, default=5000, help="mutated files to try, spread over the seeds (default 5000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the mutations (default 1)")
    parser.add_argument("--time-factor", type=float, default=5.0,
                        help="a case is a hang after this many times its bound of 2 s/MB + 1 s (default 5)")
    parser.add_argument("--no-hostile", action="store_true", help="skip the crafted hostile files")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="children loading cases at a time (default: one per CPU)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    pool = seeds()
    cases = list(pool) + ([] if args.no_hostile else hostile())
    # One generator per case: a seed file whose bytes differ between runs (torch.save writes a fresh
    # serialization id) must not change the mutations of every later case.
    cases += [mutate(pool[i % len(pool)], random.Random(f"{args.seed}-{i}"), i) for i in range(args.cases)]
    results = run_cases(cases, args.time_factor, workers=args.workers)
    print(summary(results))
    print(f"seed {args.seed}, {len(pool)} seed files, {time.monotonic() - started:.0f} s")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
