"""TorchVision's official ResNet weights, as data: one frozen record per file, read from a table.

Like TorchVision's ``Weights`` enums (``models/_api.py``, ``models/resnet.py``),
each entry is one value holding the file's URL, the preprocessing it was trained
with (``crop_size``, ``resize_size``) and its facts (num_params, acc@1); one
entry per architecture is its ``DEFAULT``. The table is
``npresnet/data/torchvision_resnet_weights.tsv``; nothing here touches the
network (``hub.py`` downloads).

The entries are public values under TorchVision's names, strings still accepted:

    npresnet.ResNet50_Weights.IMAGENET1K_V2             # a WeightsEntry; .DEFAULT is the same one
    npresnet.resnet50(weights=npresnet.ResNet50_Weights.DEFAULT)   # = weights="DEFAULT"
    npresnet.ResNet50_Weights.DEFAULT.transforms()      # ImageClassification(crop_size=224, resize_size=232, ...)
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Iterator

from .preprocess import ImageClassification

DEFAULT = "DEFAULT"

# TorchVision names each file <arch>-<first 8+ hex digits of its sha256>.pth (torch.hub's HASH_REGEX).
HASH_PREFIX = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class WeightsEntry:
    arch: str  # e.g. "resnet50"
    name: str  # e.g. "IMAGENET1K_V2"
    url: str
    crop_size: int  # center crop fed to the network
    resize_size: int  # shorter side resized to this before the crop
    num_params: int
    acc1: float  # ImageNet-1K top-1, as TorchVision reports it
    acc5: float
    default: bool

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str | None:
        return sha256_prefix(self.file_name)

    @property
    def preprocessing(self) -> dict[str, int]:
        return {"crop_size": self.crop_size, "resize_size": self.resize_size}

    def transforms(self, **changes) -> ImageClassification:
        """The preprocessing these weights were trained with, as TorchVision's ``weights.transforms()``."""
        return ImageClassification(crop_size=self.crop_size, resize_size=self.resize_size, **changes)

    def __str__(self) -> str:
        return f"{self.arch}.{self.name}"


def sha256_prefix(file_name: str) -> str | None:
    """The hash prefix TorchVision puts in a file name (resnet50-11ad3fa6.pth -> '11ad3fa6'), or None."""
    match = HASH_PREFIX.search(file_name)
    return match.group(1) if match else None


@lru_cache(maxsize=1)
def official_weights() -> tuple[WeightsEntry, ...]:
    """Every row of the table, in its order."""
    text = resources.files("npresnet.data").joinpath("torchvision_resnet_weights.tsv").read_text(encoding="utf-8")
    rows = csv.DictReader(text.splitlines(), delimiter="\t")
    return tuple(
        WeightsEntry(
            arch=r["arch"],
            name=r["weights"],
            url=r["url"],
            crop_size=int(r["crop_size"]),
            resize_size=int(r["resize_size"]),
            num_params=int(r["num_params"]),
            acc1=float(r["acc@1"]),
            acc5=float(r["acc@5"]),
            default=r["default"] == "yes",
        )
        for r in rows
    )


def weights_names(arch: str) -> list[str]:
    return [e.name for e in official_weights() if e.arch == arch]


def get_weights_entry(arch: str, name: str = DEFAULT) -> WeightsEntry:
    """The entry for `arch` named `name` ("IMAGENET1K_V1", "IMAGENET1K_V2" or "DEFAULT")."""
    entries = [e for e in official_weights() if e.arch == arch]
    if not entries:
        raise ValueError(f"no official weights for {arch!r}")
    for e in entries:
        if e.name == name or (name == DEFAULT and e.default):
            return e
    names = ", ".join([DEFAULT, *(e.name for e in entries)])
    raise ValueError(f"no weights named {name!r} for {arch}; known: {names}")


def entry_for_sha256(sha256: str, arch: str | None = None) -> WeightsEntry | None:
    """The official entry whose file-name hash prefix begins `sha256` (and whose arch is `arch`), if any."""
    for e in official_weights():
        prefix = e.sha256_prefix
        if prefix and sha256.startswith(prefix) and (arch is None or e.arch == arch):
            return e
    return None


def entry_named(file_name: str) -> WeightsEntry | None:
    """The official entry whose file is called `file_name` (e.g. "resnet50-11ad3fa6.pth"), if any."""
    for e in official_weights():
        if e.file_name == file_name:
            return e
    return None


class ArchitectureWeights:
    """One architecture's official weights by name, as TorchVision's ``ResNet50_Weights`` enum:
    ``.IMAGENET1K_V1``, ``.IMAGENET1K_V2``, ``.DEFAULT``; iterating gives every entry."""

    def __init__(self, arch: str, type_name: str):
        self.arch, self.type_name = arch, type_name

    def __getattr__(self, name: str) -> WeightsEntry:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return get_weights_entry(self.arch, name)
        except ValueError as exc:
            raise AttributeError(f"{self.type_name} has no {name}: {exc}") from None

    def __getitem__(self, name: str) -> WeightsEntry:
        return get_weights_entry(self.arch, name)

    def __iter__(self) -> Iterator[WeightsEntry]:
        return iter([e for e in official_weights() if e.arch == self.arch])

    def __dir__(self):
        return [DEFAULT, *weights_names(self.arch)]

    def __repr__(self) -> str:
        return f"{self.type_name}({', '.join(dir(self))})"


# TorchVision's names for them, architecture -> name.
WEIGHTS_TYPE_NAMES = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnet152": "ResNet152_Weights",
    "resnext50_32x4d": "ResNeXt50_32X4D_Weights",
    "resnext101_32x8d": "ResNeXt101_32X8D_Weights",
    "resnext101_64x4d": "ResNeXt101_64X4D_Weights",
    "wide_resnet50_2": "Wide_ResNet50_2_Weights",
    "wide_resnet101_2": "Wide_ResNet101_2_Weights",
}
WEIGHTS = {arch: ArchitectureWeights(arch, type_name) for arch, type_name in WEIGHTS_TYPE_NAMES.items()}
