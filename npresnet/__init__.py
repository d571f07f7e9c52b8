"""npresnet: the TorchVision ResNet family in NumPy, with PyTorch's outputs and without PyTorch.

    import npresnet
    model = npresnet.resnet50(weights="resnet50.npz")   # or npresnet.load("resnet50.npz")
    logits = model(x)                                    # x: (N, 3, H, W) float32 or float64
    maps = model.features(x)                             # stem, layer1..layer4, pool
    npresnet.classify(["cat.jpg"], model, topk=5)        # per image: [Prediction(index, label, probability)]
    npresnet.embed(["cat.jpg"], model)                   # (1, 2048) pooled features
    model.replace_head(10).train()                       # fine-tuning: see value_and_grad, SGD, AdamW
"""
from __future__ import annotations

from .autograd import value_and_grad
from .backends import available_backends, choose_backend, get_backend
from .errors import BackendUnavailable, FetchError, ImageError, WeightsError
from .evaluation import Evaluation, evaluate
from .explain import Explanation, explain, gradcam
from .formats import convert
from .hub import fetch
from .manifest import WEIGHTS, WeightsEntry
from .model import FEATURE_NAMES, ResNet, build, load, save
from .onnx_export import export_onnx
from .optim import (
    SGD,
    AdamW,
    CosineAnnealingLR,
    LinearLR,
    LinearWarmup,
    SequentialLR,
    StepLR,
    param_groups,
    warmup_cosine,
)
from .predict import Prediction, classify, embed, load_embeddings, load_labels, save_embeddings
from .preprocess import ImageClassification, preprocess, preset_for
from .quantization import QuantizedResNet, quantize
from .specs import ARCHITECTURES, ResNetSpec, count_params, get_spec
from .training import TrainConfig, fit

__version__ = "0.1.0"


def _builder(arch: str):
    spec = ARCHITECTURES[arch]

    def builder(weights=None, num_classes=None, **options) -> ResNet:
        return build(arch, weights, num_classes, **options)

    builder.__name__ = builder.__qualname__ = arch
    builder.__doc__ = (
        f"{arch}: {spec.block} blocks {spec.layers}, groups={spec.groups}, width_per_group={spec.width_per_group}.\n\n"
        "weights: a weights file (.npz, .pth, .safetensors), a state dict (TorchVision key names), or official\n"
        f"weights ({WEIGHTS[arch].type_name}.DEFAULT, or by name: 'DEFAULT', 'IMAGENET1K_V1', ...: downloaded\n"
        "and cached); None for fresh parameters.\n"
        "num_classes: head size; defaults to the weights' own, else 1000.\n"
        "Options: stem ('imagenet' or 'cifar'), backend ('auto', 'numpy', 'numba', 'cuda'), threads."
    )
    return builder


resnet18 = _builder("resnet18")
resnet34 = _builder("resnet34")
resnet50 = _builder("resnet50")
resnet101 = _builder("resnet101")
resnet152 = _builder("resnet152")
resnext50_32x4d = _builder("resnext50_32x4d")
resnext101_32x8d = _builder("resnext101_32x8d")
resnext101_64x4d = _builder("resnext101_64x4d")
wide_resnet50_2 = _builder("wide_resnet50_2")
wide_resnet101_2 = _builder("wide_resnet101_2")

# The official weights, as TorchVision names them: ResNet50_Weights.IMAGENET1K_V2, .DEFAULT, .transforms().
ResNet18_Weights = WEIGHTS["resnet18"]
ResNet34_Weights = WEIGHTS["resnet34"]
ResNet50_Weights = WEIGHTS["resnet50"]
ResNet101_Weights = WEIGHTS["resnet101"]
ResNet152_Weights = WEIGHTS["resnet152"]
ResNeXt50_32X4D_Weights = WEIGHTS["resnext50_32x4d"]
ResNeXt101_32X8D_Weights = WEIGHTS["resnext101_32x8d"]
ResNeXt101_64X4D_Weights = WEIGHTS["resnext101_64x4d"]
Wide_ResNet50_2_Weights = WEIGHTS["wide_resnet50_2"]
Wide_ResNet101_2_Weights = WEIGHTS["wide_resnet101_2"]

__all__ = [
    "ARCHITECTURES",
    "FEATURE_NAMES",
    "BackendUnavailable",
    "Explanation",
    "Evaluation",
    "FetchError",
    "ImageClassification",
    "ImageError",
    "Prediction",
    "ResNet",
    "QuantizedResNet",
    "ResNetSpec",
    "WeightsEntry",
    "WeightsError",
    "SGD",
    "AdamW",
    "TrainConfig",
    "fit",
    "CosineAnnealingLR",
    "LinearLR",
    "LinearWarmup",
    "SequentialLR",
    "StepLR",
    "param_groups",
    "value_and_grad",
    "warmup_cosine",
    "ResNet18_Weights",
    "ResNet34_Weights",
    "ResNet50_Weights",
    "ResNet101_Weights",
    "ResNet152_Weights",
    "ResNeXt50_32X4D_Weights",
    "ResNeXt101_32X8D_Weights",
    "ResNeXt101_64X4D_Weights",
    "Wide_ResNet50_2_Weights",
    "Wide_ResNet101_2_Weights",
    "available_backends",
    "build",
    "choose_backend",
    "classify",
    "convert",
    "embed",
    "explain",
    "evaluate",
    "export_onnx",
    "count_params",
    "fetch",
    "get_backend",
    "get_spec",
    "gradcam",
    "load",
    "load_embeddings",
    "load_labels",
    "preprocess",
    "preset_for",
    "quantize",
    "save",
    "save_embeddings",
    *ARCHITECTURES,
]
