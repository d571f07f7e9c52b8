"""count_macs against TorchVision's documented GFLOPS (the manifest's gflops column, from TorchVision's docs)."""
import csv
from importlib import resources

import pytest

from npresnet.specs import ARCHITECTURES, CIFAR_STEM, count_macs


def documented_gflops() -> dict[str, float]:
    text = resources.files("npresnet.data").joinpath("torchvision_resnet_weights.tsv").read_text()
    return {row["arch"]: float(row["gflops"]) for row in csv.DictReader(text.splitlines(), delimiter="\t")}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_gflops_match_torchvision(arch):
    assert round(count_macs(ARCHITECTURES[arch]) / 1e9, 3) == documented_gflops()[arch]


def test_macs_follow_the_input_size():
    spec = ARCHITECTURES["resnet18"]
    # fc is 512 x 1000 whatever the size; the convolutions scale with the output area of each layer.
    fc = 512 * 1000
    assert count_macs(spec, 448, 448) - fc == 4 * (count_macs(spec) - fc)
    # CIFAR stem at 32x32: conv1 3x3 stride 1 (64 * 27 * 32 * 32) and no max pool; the layers then see 32x32,
    # which is what the ImageNet stem gives them at 128x128.
    cifar = spec.replace(stem=CIFAR_STEM, num_classes=10)
    imagenet_stem = 64 * 3 * 49 * 64 * 64
    assert count_macs(cifar, 32, 32) - 64 * 27 * 32 * 32 - 5120 == count_macs(spec, 128, 128) - imagenet_stem - fc
