"""The training-step benchmark: one SGD step of resnet18, npresnet beside torch eager.

    python bench/train_step.py                       # batch 32 at 112x112 and 224x224, 2 threads
    python bench/train_step.py --sizes 112 --repeats 2

One step is the forward pass in training mode (batch statistics), the backward pass to every
parameter, and an SGD update (momentum 0.9, weight decay 1e-4): npresnet.value_and_grad +
npresnet.SGD.step against torch's forward, loss.backward() and torch.optim.SGD.step, on the same
random float32 batch. Each (runner, size) runs in its own process, so that its peak resident
memory (ru_maxrss) belongs to that runner alone; the process builds the model and runs `--warmup`
steps. The runners of one size then take turns, one timed step each, `--repeats` rounds (with a
pause between steps, so that no BLAS thread still spinning from one runner's step slows the next):
this machine's speed drifts by 20% over minutes, and runners timed one after the other measured
that drift as much as themselves. Each row is the median of its runner's steps, wall and CPU
seconds. Threads are pinned through the environment (OMP/OPENBLAS/MKL/NUMBA/NPRESNET) and
torch.set_num_threads.
The npresnet runners: "numpy", the NumPy backend (the training pass on the reference ops of
functional.py), and "numba", the Numba backend (its compiled training ops, npresnet_kernels.train;
its kernels are compiled, or loaded from the cache, during the warm-up step).

Results: bench/results/train_step.json and train_step.md. Timings never decide a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import turns  # noqa: E402
RESULTS = HERE / "results"


def _npresnet_step(arch: str, threads: int, backend: str):
    import npresnet

    model = npresnet.build(arch, backend=backend, threads=threads).train()
    opt = npresnet.SGD(model, lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(x, labels):
        loss, grads = npresnet.value_and_grad(model, x, labels)
        opt.step(grads)
        return loss

    return step


def _torch_step(arch: str, threads: int):
    import torch
    import torch.nn.functional as TF

    sys.path.insert(0, str(ROOT / "tests"))
    from torch_resnet import torch_resnet

    from npresnet.specs import get_spec

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch_resnet(get_spec(arch)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(x, labels):
        opt.zero_grad(set_to_none=True)
        loss = TF.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels))
        loss.backward()
        opt.step()
        return loss.item()

    return step


def worker(runner: str, arch: str, batch: int, size: int, threads: int, warmup: int) -> None:
    """Build and warm up, say "ready"; then one timed step per "step" line on stdin, "done" for the summary.

    Every reply is one JSON line on stdout.
    """
    import numpy as np

    step = _torch_step(arch, threads) if runner == "torch" else _npresnet_step(arch, threads, backend=runner)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, 1000, batch)
    for _ in range(warmup):
        step(x, labels)
    turns.say({"ready": True})

    def timed_step():
        start, cpu = time.perf_counter(), time.process_time()
        loss = step(x, labels)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert np.isfinite(loss)
        return {"s": wall, "cpu_s": cpu}

    turns.serve("step", timed_step)


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"Machine: {meta['machine']}, {meta['cpus']} CPUs, Python {meta['python']}; {meta['threads']} threads; "
        f"resnet18 training step (forward in train mode, backward, SGD momentum) on float32; median of "
        f"{meta['repeats']} after {meta['warmup']} warm-up step(s); each row its own process, the runners "
        f"taking turns step by step; "
        f"load average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after; {meta['when']}.",
        "",
        "| size | batch | runner | s/step | images/s | ratio to torch | CPU s/step | peak RSS MB | RSS ratio to torch |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        torch_row = next((t for t in results if t["runner"] == "torch" and t["size"] == r["size"]), None)
        ratio = f"{r['s_per_step'] / torch_row['s_per_step']:.2f}" if torch_row else "-"
        rss_ratio = f"{r['peak_rss_mb'] / torch_row['peak_rss_mb']:.2f}" if torch_row else "-"
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['runner']} | {r['s_per_step']:.2f} | {r['batch'] / r['s_per_step']:.1f} | "
            f"{ratio} | {r['cpu_s_per_step']:.2f} | {r['peak_rss_mb']:.0f} | {rss_ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[112, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runners", nargs="*", default=["numpy", "numba", "torch"], choices=["numpy", "numba", "torch"])
    parser.add_argument("--name", default="train_step")
    parser.add_argument("--worker", nargs=2, metavar=("RUNNER", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        runner, size = args.worker
        worker(runner, "resnet18", args.batch, int(size), args.threads, args.warmup)
        return 0
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "load_before": os.getloadavg()[0],
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    results = []
    for size in args.sizes:
        workers = {}
        try:
            for runner in args.runners:  # one at a time: building and warming up is not timed, but it uses the cores
                w = turns.Worker(__file__, ["--worker", runner, str(size), "--batch", str(args.batch),
                                            "--threads", str(args.threads), "--warmup", str(args.warmup)], args.threads)
                if "error" in w.ready:
                    sys.stderr.write(f"the {runner} worker at {size}: {w.ready['error']}\n")
                    return 1
                workers[runner] = (w, {"s": [], "cpu_s": []})
            for _ in range(args.repeats):
                for runner, (w, got) in workers.items():
                    time.sleep(0.5)  # let the last step's BLAS threads go idle
                    r = w.ask("step")
                    if "error" in r:
                        sys.stderr.write(f"the {runner} worker at {size}: {r['error']}\n")
                        return 1
                    got["s"].append(r["s"])
                    got["cpu_s"].append(r["cpu_s"])
            for runner, (w, got) in workers.items():
                results.append({
                    "runner": runner, "arch": "resnet18", "batch": args.batch, "size": size,
                    "s_per_step": statistics.median(got["s"]), "cpu_s_per_step": statistics.median(got["cpu_s"]),
                    "times": got["s"], "peak_rss_mb": w.close()["peak_rss_mb"],
                })
                print(json.dumps(results[-1]), flush=True)
        finally:
            for w, _ in workers.values():
                w.kill()
    meta["load_after"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    table = markdown(results, meta)
    (RESULTS / f"{args.name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
