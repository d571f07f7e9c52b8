"""Largest error of npresnet against the torch oracle, per architecture and dtype.

    python bench/accuracy.py [--size 64] [--batch 2] [--backend numpy] [--arch resnet18 ...]

Builds each architecture in torch (tests/torch_resnet.py: TorchVision's layout, random weights and
batch-norm statistics), loads the same state dict into npresnet, and prints the largest absolute
difference of the logits and of every feature map, relative to the largest magnitude of torch's
output. Needs torch (the test oracle); npresnet itself never imports it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from torch_resnet import numpy_state_dict, randomise, torch_resnet  # noqa: E402

import npresnet  # noqa: E402
from npresnet.specs import ARCHITECTURES, get_spec  # noqa: E402


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))) / np.max(np.abs(want)))


def measure(arch: str, shape, backend: str) -> dict[str, float]:
    tmodel = randomise(torch_resnet(get_spec(arch)), seed=0)
    result = {}
    for label, np_dtype, t_dtype in (("float32", np.float32, torch.float32), ("float64", np.float64, torch.float64)):
        tmodel = tmodel.to(t_dtype)
        model = npresnet.build(arch, numpy_state_dict(tmodel), backend=backend)
        x = np.random.default_rng(1).standard_normal(shape).astype(np_dtype)
        with torch.no_grad():
            want = {k: v.numpy() for k, v in tmodel.features(torch.from_numpy(x)).items()}
            want["logits"] = tmodel(torch.from_numpy(x)).numpy()
        got = model.features(x)
        got["logits"] = model(x)
        result[f"{label} logits"] = rel_error(got["logits"], want["logits"])
        result[f"{label} worst map"] = max(rel_error(got[k], want[k]) for k in npresnet.FEATURE_NAMES)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--arch", nargs="*", default=list(ARCHITECTURES))
    args = parser.parse_args()
    shape = (args.batch, 3, args.size, args.size)
    columns = ["float32 logits", "float32 worst map", "float64 logits", "float64 worst map"]
    print(f"backend {args.backend}, input {shape}, error relative to max |torch output|\n")
    print("| architecture | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for arch in args.arch:
        errors = measure(arch, shape, args.backend)
        print(f"| {arch} | " + " | ".join(f"{errors[c]:.1e}" for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
