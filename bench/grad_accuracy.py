"""Largest gradient error of npresnet.value_and_grad against torch autograd, per architecture and dtype.

    python bench/grad_accuracy.py [--size 64] [--batch 2] [--mode train eval] [--arch resnet18 ...] [--backend numpy]

Builds each architecture in torch (tests/torch_resnet.py: TorchVision's layout, random weights and
batch-norm statistics), loads the same state dict into npresnet, runs one cross-entropy forward and
backward in both, and prints, over every parameter tensor, the largest absolute gradient difference
relative to the largest magnitude of torch's gradient for that tensor (the tests' measure). The
"torch f32 vs f64" column is torch's own float32 gradients against its float64 ones: how well the
problem is conditioned, the floor no float32 implementation can beat. Needs torch (the oracle).
The table for every architecture, and why its float32 columns are what they are (ReLU decisions that
float32 rounding flips, in both libraries): bench/results/grad_accuracy.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402
from torch_resnet import numpy_state_dict, randomise, torch_resnet  # noqa: E402

import npresnet  # noqa: E402
from npresnet.specs import ARCHITECTURES, get_spec  # noqa: E402


def worst(got: dict, want: dict) -> float:
    return max(
        float(np.max(np.abs(got[k].astype(np.float64) - want[k].astype(np.float64))) / np.max(np.abs(want[k])))
        for k in want
    )


def torch_grads(spec, state, x, labels, training, dtype):
    model = torch_resnet(spec)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    model.to(dtype).train(training)
    TF.cross_entropy(model(torch.from_numpy(x).to(dtype)), torch.from_numpy(labels)).backward()
    return {k: p.grad.numpy() for k, p in model.named_parameters()}


def measure(arch: str, shape, training: bool, backend: str = "numpy") -> dict[str, float]:
    spec = get_spec(arch, num_classes=10)
    state = numpy_state_dict(randomise(torch_resnet(spec), seed=0).double())
    x = np.random.default_rng(1).standard_normal(shape)
    labels = np.random.default_rng(2).integers(0, 10, shape[0])
    result = {}
    want = {}
    for label, np_dtype, t_dtype in (("f32", np.float32, torch.float32), ("f64", np.float64, torch.float64)):
        want[label] = torch_grads(spec, state, x, labels, training, t_dtype)
        cast = {k: v.astype(np_dtype) if v.dtype.kind == "f" else v for k, v in state.items()}
        model = npresnet.build(arch, cast, backend=backend).train(training)
        _, grads = npresnet.value_and_grad(model, x.astype(np_dtype), labels)
        result[label] = worst(grads, want[label])
    result["torch f32 vs f64"] = worst(want["f32"], want["f64"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--mode", nargs="*", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--arch", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--backend", default="numpy", help="npresnet backend whose training pass is measured (numpy, numba)")
    args = parser.parse_args()
    shape = (args.batch, 3, args.size, args.size)
    columns = [f"{mode} {c}" for mode in args.mode for c in ("f32", "f64", "torch f32 vs f64")]
    print(f"{args.backend} backend, input {shape}, 10 classes; largest |gradient error| relative to max |torch gradient| of its tensor\n")
    print("| architecture | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for arch in args.arch:
        cells = []
        for mode in args.mode:
            errors = measure(arch, shape, mode == "train", args.backend)
            cells += [errors[c] for c in ("f32", "f64", "torch f32 vs f64")]
        print(f"| {arch} | " + " | ".join(f"{e:.1e}" for e in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
