"""The ResNet family as data.

Every member is (block, layers, groups, width_per_group) plus a head size and
a stem, as in TorchVision's ``models/resnet.py``: each builder there is one
call into a shared ``_resnet``; here each is one row of ``ARCHITECTURES``.
The stage widths (``planes``, 64 to 512 in the whole family) are part of the
spec too, so that a small network for a test is just another value, as a tiny
GPT is just another ``GPTConfig`` in nanoGPT.

References: He et al., "Deep Residual Learning for Image Recognition" (2015);
Xie et al., "Aggregated Residual Transformations" (ResNeXt, 2016);
Zagoruyko & Komodakis, "Wide Residual Networks" (2016); TorchVision 0.2x.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

from .functional import conv_output_size

BASIC = "basic"
BOTTLENECK = "bottleneck"
IMAGENET_STEM = "imagenet"  # 7x7 stride-2 conv1, then 3x3 stride-2 max pool
CIFAR_STEM = "cifar"  # 3x3 stride-1 conv1, no max pool: for 32x32 inputs

TORCHVISION_PLANES = (64, 128, 256, 512)


@dataclass(frozen=True)
class ResNetSpec:
    """One architecture: enough to name every parameter and its shape."""

    name: str
    block: str  # BASIC or BOTTLENECK
    layers: tuple[int, int, int, int]  # blocks per stage
    groups: int = 1
    width_per_group: int = 64
    num_classes: int = 1000
    stem: str = IMAGENET_STEM
    # Each stage's `planes` (its blocks put out planes * expansion channels); the stem puts out
    # planes[0], TorchVision's inplanes = 64.
    planes: tuple[int, int, int, int] = TORCHVISION_PLANES

    def __post_init__(self):
        if self.block not in (BASIC, BOTTLENECK):
            raise ValueError(f"block must be {BASIC!r} or {BOTTLENECK!r}, not {self.block!r}")
        if self.stem not in (IMAGENET_STEM, CIFAR_STEM):
            raise ValueError(f"stem must be {IMAGENET_STEM!r} or {CIFAR_STEM!r}, not {self.stem!r}")
        if self.block == BASIC and (self.groups != 1 or self.width_per_group != 64):
            raise ValueError("BasicBlock only supports groups=1 and width_per_group=64 (as in TorchVision)")
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"layers must be four positive block counts, not {self.layers!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, not {self.num_classes}")
        if len(self.planes) != 4 or min(self.planes) < 1:
            raise ValueError(f"planes must be four positive stage widths, not {self.planes!r}")
        widths = [p * self.width_per_group // 64 * self.groups for p in self.planes]
        if min(widths) < 1:
            raise ValueError(f"planes {self.planes} with width_per_group={self.width_per_group} leave a stage no channels")

    @property
    def expansion(self) -> int:
        """Output channels of a block per `planes`: 1 for BasicBlock, 4 for Bottleneck."""
        return 1 if self.block == BASIC else 4

    @property
    def stem_width(self) -> int:
        """Channels out of conv1: planes[0] (64 in TorchVision)."""
        return self.planes[0]

    @property
    def num_features(self) -> int:
        """Width of the pooled embedding fed to fc: the last stage's planes x expansion (512 x expansion)."""
        return self.planes[-1] * self.expansion

    def replace(self, **changes) -> "ResNetSpec":
        return dataclasses.replace(self, **changes)

    def blocks(self) -> Iterator["BlockSpec"]:
        """Every residual block in order, with its channel counts and stride."""
        inplanes = self.stem_width
        for stage, (planes, depth) in enumerate(zip(self.planes, self.layers), start=1):
            for index in range(depth):
                # TorchVision: the first block of stages 2-4 halves the resolution.
                stride = 2 if (stage > 1 and index == 0) else 1
                outplanes = planes * self.expansion
                yield BlockSpec(
                    prefix=f"layer{stage}.{index}",
                    stage=stage,
                    block=self.block,
                    inplanes=inplanes,
                    planes=planes,
                    # Bottleneck width: planes * (base_width / 64) * groups (TorchVision).
                    width=planes * self.width_per_group // 64 * self.groups,
                    outplanes=outplanes,
                    stride=stride,
                    groups=self.groups,
                    downsample=(stride != 1 or inplanes != outplanes),
                )
                inplanes = outplanes


@dataclass(frozen=True)
class BlockSpec:
    prefix: str  # state-dict prefix, e.g. "layer2.0"
    stage: int  # 1 to 4: layer1 to layer4
    block: str
    inplanes: int
    planes: int
    width: int  # channels of a Bottleneck's 3x3 conv
    outplanes: int
    stride: int
    groups: int
    downsample: bool  # a 1x1 conv + BN on the identity path where the shape changes


@dataclass(frozen=True)
class ConvSpec:
    """A convolution followed by its batch norm, named by their state-dict prefixes."""

    conv: str  # e.g. "layer1.0.conv1" (key "layer1.0.conv1.weight")
    bn: str  # e.g. "layer1.0.bn1" (keys ".weight", ".bias", ".running_mean", ".running_var")
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    groups: int = 1

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        k = self.kernel_size
        return (self.out_channels, self.in_channels // self.groups, k, k)


def stem_conv(spec: ResNetSpec) -> ConvSpec:
    if spec.stem == CIFAR_STEM:
        return ConvSpec("conv1", "bn1", 3, spec.stem_width, kernel_size=3, stride=1, padding=1)
    return ConvSpec("conv1", "bn1", 3, spec.stem_width, kernel_size=7, stride=2, padding=3)


def block_convs(b: BlockSpec) -> dict[str, ConvSpec]:
    """The convolutions of one block, keyed by role: conv1, conv2[, conv3][, downsample]."""
    p = b.prefix
    if b.block == BASIC:
        convs = {
            "conv1": ConvSpec(f"{p}.conv1", f"{p}.bn1", b.inplanes, b.planes, 3, b.stride, 1),
            "conv2": ConvSpec(f"{p}.conv2", f"{p}.bn2", b.planes, b.planes, 3, 1, 1),
        }
    else:
        # "ResNet v1.5": the stride sits on the 3x3 conv2, not on the 1x1 conv1 as in the
        # original paper; TorchVision does this, after NVIDIA's "ResNet v1.5" recipe
        # (https://ngc.nvidia.com/catalog/model-scripts/nvidia:resnet_50_v1_5_for_pytorch).
        convs = {
            "conv1": ConvSpec(f"{p}.conv1", f"{p}.bn1", b.inplanes, b.width, 1, 1, 0),
            "conv2": ConvSpec(f"{p}.conv2", f"{p}.bn2", b.width, b.width, 3, b.stride, 1, b.groups),
            "conv3": ConvSpec(f"{p}.conv3", f"{p}.bn3", b.width, b.outplanes, 1, 1, 0),
        }
    if b.downsample:
        convs["downsample"] = ConvSpec(f"{p}.downsample.0", f"{p}.downsample.1", b.inplanes, b.outplanes, 1, b.stride, 0)
    return convs


def all_convs(spec: ResNetSpec) -> list[ConvSpec]:
    convs = [stem_conv(spec)]
    for b in spec.blocks():
        convs.extend(block_convs(b).values())
    return convs


BN_KEYS = ("weight", "bias", "running_mean", "running_var")
# The stages a network is frozen by, input first: model.freeze("layer2") freezes stem, layer1 and layer2.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def stage_of(key: str) -> str:
    """The stage a state-dict key belongs to: "stem" (conv1, bn1), "layer1".."layer4", or "fc"."""
    head = key.split(".", 1)[0]
    if head in ("conv1", "bn1"):
        return "stem"
    if head in STAGES or head == "fc":
        return head
    raise ValueError(f"{key!r} is not a ResNet state-dict key")


def is_parameter(key: str) -> bool:
    """True for learnable parameters (conv, batch-norm and fc weights and biases), False for running statistics."""
    return not key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def parameter_shapes(spec: ResNetSpec) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of `spec` (TorchVision's names, no num_batches_tracked) and its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for c in all_convs(spec):
        shapes[f"{c.conv}.weight"] = c.weight_shape
        for key in BN_KEYS:
            shapes[f"{c.bn}.{key}"] = (c.out_channels,)
    shapes["fc.weight"] = (spec.num_classes, spec.num_features)
    shapes["fc.bias"] = (spec.num_classes,)
    return shapes


def count_params(spec: ResNetSpec) -> int:
    """Learnable parameters, as TorchVision counts them (running statistics excluded)."""
    total = 0
    for key, shape in parameter_shapes(spec).items():
        if key.endswith(("running_mean", "running_var")):
            continue
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def count_macs(spec: ResNetSpec, height: int = 224, width: int = 224) -> int:
    """Multiply-adds of one forward pass on a height x width image: convolutions and fc.

    TorchVision's "GFLOPS" column counts exactly these (resnet18: 1.814e9 at 224x224);
    batch norm (folded), ReLU, pooling and residual additions are not counted.
    """

    def conv(c: ConvSpec, h: int, w: int) -> tuple[int, int, int]:
        h = conv_output_size(h, c.kernel_size, c.stride, c.padding)
        w = conv_output_size(w, c.kernel_size, c.stride, c.padding)
        per_output = (c.in_channels // c.groups) * c.kernel_size * c.kernel_size
        return c.out_channels * per_output * h * w, h, w

    total, h, w = conv(stem_conv(spec), height, width)
    if spec.stem == IMAGENET_STEM:
        h, w = conv_output_size(h, 3, 2, 1), conv_output_size(w, 3, 2, 1)  # 3x3 stride-2 max pool
    for b in spec.blocks():
        convs = block_convs(b)
        if "downsample" in convs:
            total += conv(convs["downsample"], h, w)[0]
        for role in ("conv1", "conv2", "conv3"):
            if role in convs:
                macs, h, w = conv(convs[role], h, w)
                total += macs
    return total + spec.num_features * spec.num_classes


def _spec(name, block, layers, groups=1, width_per_group=64):
    return ResNetSpec(name=name, block=block, layers=layers, groups=groups, width_per_group=width_per_group)


ARCHITECTURES: dict[str, ResNetSpec] = {
    s.name: s
    for s in (
        _spec("resnet18", BASIC, (2, 2, 2, 2)),
        _spec("resnet34", BASIC, (3, 4, 6, 3)),
        _spec("resnet50", BOTTLENECK, (3, 4, 6, 3)),
        _spec("resnet101", BOTTLENECK, (3, 4, 23, 3)),
        _spec("resnet152", BOTTLENECK, (3, 8, 36, 3)),
        _spec("resnext50_32x4d", BOTTLENECK, (3, 4, 6, 3), groups=32, width_per_group=4),
        _spec("resnext101_32x8d", BOTTLENECK, (3, 4, 23, 3), groups=32, width_per_group=8),
        _spec("resnext101_64x4d", BOTTLENECK, (3, 4, 23, 3), groups=64, width_per_group=4),
        _spec("wide_resnet50_2", BOTTLENECK, (3, 4, 6, 3), width_per_group=128),
        _spec("wide_resnet101_2", BOTTLENECK, (3, 4, 23, 3), width_per_group=128),
    )
}


def get_spec(arch: str | ResNetSpec, num_classes: int | None = None, stem: str | None = None) -> ResNetSpec:
    """The spec named `arch` (or `arch` itself), with num_classes and stem replaced when given."""
    if isinstance(arch, ResNetSpec):
        spec = arch
    else:
        try:
            spec = ARCHITECTURES[arch]
        except KeyError:
            raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}") from None
    changes = {}
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if stem is not None:
        changes["stem"] = stem
    return spec.replace(**changes) if changes else spec


def infer_spec(shapes: dict[str, tuple[int, ...]]) -> ResNetSpec:
    """The architecture a state dict was made for, read from its keys and shapes.

    shapes: key -> shape. Raises ValueError naming what is missing or inconsistent;
    the caller still validates every key against the spec this returns.
    """
    for key in ("conv1.weight", "fc.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight"):
        if key not in shapes:
            raise ValueError(f"cannot infer the architecture: key {key!r} is missing (is this a ResNet state dict?)")
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight", "fc.weight"):
        want = 2 if key == "fc.weight" else 4
        if len(shapes[key]) != want or min(shapes[key]) < 1:
            raise ValueError(f"cannot infer the architecture: {key} has shape {shapes[key]}, expected {want} positive dimensions")
    block = BOTTLENECK if "layer1.0.conv3.weight" in shapes else BASIC
    layers = []
    for stage in range(1, 5):
        depth = 0
        while f"layer{stage}.{depth}.conv1.weight" in shapes:
            depth += 1
        if depth == 0:
            raise ValueError(f"cannot infer the architecture: no blocks found for layer{stage}")
        layers.append(depth)
    conv1 = shapes["conv1.weight"]
    if len(conv1) != 4:
        raise ValueError(f"cannot infer the architecture: conv1.weight has shape {conv1}, expected 4 dimensions")
    stem = CIFAR_STEM if conv1[2:] == (3, 3) else IMAGENET_STEM
    fc = shapes["fc.weight"]
    if len(fc) != 2:
        raise ValueError(f"cannot infer the architecture: fc.weight has shape {fc}, expected 2 dimensions")
    num_classes = fc[0]
    # A stage's planes: its first block's output channels (conv2 of a BasicBlock, conv3 of a Bottleneck) / expansion.
    last, expansion = ("conv3", 4) if block == BOTTLENECK else ("conv2", 1)
    planes = []
    for stage in range(1, 5):
        shape = shapes.get(f"layer{stage}.0.{last}.weight")
        if shape is None or len(shape) != 4 or shape[0] % expansion:
            raise ValueError(f"cannot infer the architecture: layer{stage}.0.{last}.weight has shape {shape}")
        planes.append(shape[0] // expansion)
    groups, width_per_group = 1, 64
    if block == BOTTLENECK:
        width = shapes["layer1.0.conv1.weight"][0]  # width = planes * width_per_group / 64 * groups
        conv2_in = shapes["layer1.0.conv2.weight"]
        if len(conv2_in) != 4 or conv2_in[1] < 1 or width % conv2_in[1]:
            raise ValueError(f"cannot infer the architecture: layer1.0.conv2.weight has shape {conv2_in}")
        groups = width // conv2_in[1]
        width_per_group = width // groups * 64 // planes[0]
    layers_t, planes_t = tuple(layers), tuple(planes)
    name = "custom"
    for known in ARCHITECTURES.values():
        if (known.block, known.layers, known.groups, known.width_per_group, known.planes) == (
            block, layers_t, groups, width_per_group, planes_t
        ):
            name = known.name
            break
    return ResNetSpec(name, block, layers_t, groups, width_per_group, num_classes, stem, planes_t)
