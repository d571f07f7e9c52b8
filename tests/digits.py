"""A really trained ResNet for the INT8 tests: TorchVision's resnet18 (CIFAR stem) on scikit-learn's digits.

    python tests/digits.py OUT_DIR     # writes OUT_DIR/digits.npz, OUT_DIR/calibration/<digit>/*.png, OUT_DIR/held_out/...

The 1797 8x8 grey digits become RGB images (0..16 scaled to 0..255), preprocessed as npresnet's
preset prepares them at inference (crop and resize 8, ImageNet normalisation); torch (the tests'
oracle, never npresnet) trains resnet18 for two epochs on 1000 of them; its state dict becomes an
npresnet .npz whose metadata names that preset, so that `npresnet quantize` / `evaluate` read the
PNG folders exactly as the model was trained. The other 797 are held out. Seeds everywhere.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

import npresnet
from npresnet.specs import get_spec
from torch_resnet import numpy_state_dict, torch_resnet

SIZE = 8  # digits are 8x8; the CIFAR stem keeps layer4 at 1x1
TRAIN = 1000  # of 1797; the other 797 are held out
EPOCHS = 2
CALIBRATION = 64  # PNGs written for calibration, taken from the training images


def dataset() -> tuple:
    """(RGB images, x (1797, 3, 8, 8) preprocessed as inference prepares them, labels, training and held-out indices)."""
    digits = load_digits()
    pixels = np.round(digits.images / 16 * 255).astype(np.uint8)  # (1797, 8, 8)
    images = list(np.repeat(pixels[..., None], 3, axis=-1))  # RGB (8, 8, 3) uint8
    preset = npresnet.ImageClassification(crop_size=SIZE, resize_size=SIZE)
    x = npresnet.preprocess(images, preset)  # (1797, 3, 8, 8), as inference prepares them
    y = digits.target
    order = np.random.default_rng(0).permutation(len(y))
    return images, x, y, order[:TRAIN], order[TRAIN:]


def result(folder: str | Path) -> dict:
    """What train(folder) returns, for a folder it has written (in this process or another): paths and held-out arrays."""
    folder = Path(folder)
    _, x, y, trained_on, held_out = dataset()
    return {
        "float": folder / "digits.npz",
        "calibration": folder / "calibration",
        "held_out": folder / "held_out",
        "x": x[held_out],
        "y": y[held_out],
        "calibration_x": x[trained_on[:CALIBRATION]],
    }


def train(folder: str | Path) -> dict:
    """Train, write the float32 .npz and the PNG folders under `folder`; return paths and held-out arrays."""
    start = time.perf_counter()
    folder = Path(folder)
    images, x, y, trained_on, held_out = dataset()

    torch.manual_seed(0)
    net = torch_resnet(get_spec("resnet18", num_classes=10, stem="cifar"))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    inputs, targets = torch.from_numpy(x[trained_on]), torch.from_numpy(y[trained_on])
    for _ in range(EPOCHS):
        net.train()
        for batch in torch.randperm(TRAIN).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    net.eval()

    model = npresnet.build("resnet18", numpy_state_dict(net), backend="numpy")
    model.meta.update(crop_size=SIZE, resize_size=SIZE)
    npresnet.save(model, folder / "digits.npz")
    for name, indices in (("calibration", trained_on[:CALIBRATION]), ("held_out", held_out)):
        for i in indices:  # ImageFolder layout: <digit>/<index>.png
            (folder / name / str(y[i])).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / name / str(y[i]) / f"{i}.png")
    return {**result(folder), "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    trained = train(sys.argv[1])
    print(f"{trained['float']}: resnet18 trained on {TRAIN} digits in {trained['seconds']:.0f} s; "
          f"{len(trained['y'])} held out in {trained['held_out']}, {CALIBRATION} calibration images in {trained['calibration']}")
