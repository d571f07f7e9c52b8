"""A real `npresnet train` run, start to finish, for the README: scikit-learn's handwritten digits.

    python bench/finetune_digits.py [--workdir DIR] [--epochs 2] [--threads 1]

Writes the 1797 8x8 digit scans as 16x16 RGB PNGs in an ImageFolder tree (DIR/digits/train/<digit>/,
DIR/digits/val/<digit>/: every fifth image is held out), then runs, in DIR, as a user would:

    npresnet train digits --arch resnet18 --stem cifar --image-size 8 --no-hflip ... -o digits.npz
    npresnet classify --weights digits.npz --topk 3 <two held-out images>

and prints the commands and their output as a console transcript (stderr merged, as a terminal shows
it; piped, so there is no progress bar), with the wall time of each command. Needs scikit-learn.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from image_files import write_digits_folder  # noqa: E402


def npresnet(arguments: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Run `npresnet ARGUMENTS` (this interpreter's), showing it as typed; its wall time in seconds."""
    print("$ npresnet " + " ".join(arguments), flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "npresnet", *arguments], cwd=cwd, env=env, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where the digits folder and the weights go (default: a temporary folder)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1: on a shared 2-core machine, more only contend)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="npresnet-digits-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "digits").exists():
        write_digits_folder(workdir / "digits", size=16)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
           "NPRESNET_NUM_THREADS": str(args.threads)}
    load = os.getloadavg()[0]
    train = ["train", "digits", "--arch", "resnet18", "--stem", "cifar", "--image-size", "8", "--no-hflip",
             "--epochs", str(args.epochs), "--batch-size", "32", "--lr", "0.02", "--weight-decay", "5e-4",
             "--backend", "numpy", "-o", "digits.npz"]
    train_seconds = npresnet(train, workdir, env)
    val = workdir / "digits" / "val"
    samples = [sorted((val / digit).iterdir())[0].relative_to(workdir) for digit in ("3", "8")]
    classify_seconds = npresnet(["classify", "--weights", "digits.npz", "--topk", "3", *map(str, samples)], workdir, env)
    print(f"# train {train_seconds:.0f} s, classify {classify_seconds:.1f} s (wall); {os.cpu_count()} CPUs, "
          f"{args.threads} BLAS thread(s), load average {load:.1f} before; in {workdir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
