"""ONNX export, written from npresnet's own architecture table: no torch involved.

    import npresnet
    model = npresnet.load("resnet18.npz")
    npresnet.export_onnx(model, "resnet18.onnx")                  # input "input", output "logits"
    npresnet.export_onnx(model, "backbone.onnx", features=True)   # adds "layer1".."layer4" (C2-C5)

The graph is built the way ``model.py`` runs the network, walking the spec with
``specs.stem_conv`` / ``specs.block_convs``, out of standard operators only:
Conv, Relu, MaxPool, Add, GlobalAveragePool, Flatten, Gemm. Every batch norm is
folded into the convolution before it (``functional.fold_batch_norm``, in
float64, then rounded once to float32), exactly as npresnet folds it before
running, so the file holds one Conv with a bias per conv + batch norm pair. The
initializers keep TorchVision's names (``layer1.0.conv1.weight``, its folded
``layer1.0.conv1.bias``, ``fc.weight``, ``fc.bias``).

The graph builder is a handful of ``add_*`` functions, each appending one node
(and its initializers) to a ``GraphBuilder``; ``resnet_graph`` calls them in the
order of the forward pass, and takes the conv and linear functions as
parameters so that a variant (e.g. one inserting QuantizeLinear /
DequantizeLinear around each Conv) can wrap ``add_conv`` / ``add_gemm``
without copying the walk.

Inputs and outputs, with TorchVision-style names: ``input`` (N, 3, H, W) float32,
RGB, normalised as the preprocessing in the metadata says; ``logits``
(N, num_classes); with ``features=True`` also ``layer1``..``layer4``, the outputs
of TorchVision's stages (the names ``IntermediateLayerGetter`` gives them in
detection backbones), strides 4, 8, 16, 32. Batch and spatial axes are dynamic
unless fixed.

The model's ``metadata_props`` carry what a deployment needs to feed it: arch,
num_classes, classes (a JSON list of names), mean, std (JSON lists), crop_size,
resize_size, interpolation, and how batch norm was treated.

References: the ONNX operator specifications (https://onnx.ai/onnx/operators/),
``onnx.helper`` (make_node, make_graph, make_model); TorchVision
``models/resnet.py`` and ``models/_utils.py`` (``IntermediateLayerGetter``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from . import functional as F
from .errors import DataError
from .predict import labels_for
from .preprocess import preset_for
from .specs import IMAGENET_STEM, ConvSpec, ResNetSpec, block_convs, stem_conv
from .weights import atomic_write

DEFAULT_OPSET = 17
MIN_OPSET = 13  # the lowest opset the tests run; every operator used here is unchanged since
DYNAMIC = "dynamic"
INPUT_NAME = "input"
LOGITS_NAME = "logits"
FEATURE_OUTPUTS = ("layer1", "layer2", "layer3", "layer4")
INSTALL_HINT = 'pip install "npresnet[onnx]"'


def require_onnx():
    """The onnx module, or an ImportError that says how to install it."""
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the onnx package ({exc}); install it with: {INSTALL_HINT}") from None
    return onnx


# --- the graph builder -------------------------------------------------------------------------------------------


@dataclass
class GraphBuilder:
    """The nodes and initializers of one ONNX graph, appended in execution order.

    Tensor names are unique: each node's output is named by its caller, and
    adding a name twice is an error rather than a silently rewired graph.
    """

    onnx: Any  # the onnx module
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    names: set = field(default_factory=set)

    def _claim(self, name: str) -> str:
        if name in self.names:
            raise ValueError(f"ONNX graph: the tensor name {name!r} is used twice")
        self.names.add(name)
        return name

    def initializer(self, name: str, array: np.ndarray) -> str:
        """A constant tensor (a weight or a bias) named `name`, stored as it is (float32 here)."""
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), self._claim(name)))
        return name

    def node(self, op_type: str, inputs: list[str], output: str, name: str | None = None, **attributes) -> str:
        """Append one node with one output, `output`; returns that output's name."""
        self.nodes.append(
            self.onnx.helper.make_node(op_type, inputs, [self._claim(output)], name=name or output, **attributes)
        )
        return output


def add_conv(
    graph: GraphBuilder, name: str, x: str, weight: np.ndarray, bias: np.ndarray, stride: int, padding: int, groups: int
) -> str:
    """Conv (with its folded batch norm as the bias): x (N, C, H, W) -> (N, K, P, Q); output named `name`.

    weight (K, C/G, R, S) and bias (K,) become initializers `name`.weight and `name`.bias.
    """
    R, S = weight.shape[2:]
    w = graph.initializer(f"{name}.weight", weight)
    b = graph.initializer(f"{name}.bias", bias)
    return graph.node(
        "Conv",
        [x, w, b],
        name,
        kernel_shape=[R, S],
        strides=[stride, stride],
        pads=[padding, padding, padding, padding],
        dilations=[1, 1],
        group=groups,
    )


def add_relu(graph: GraphBuilder, name: str, x: str) -> str:
    return graph.node("Relu", [x], name)


def add_add(graph: GraphBuilder, name: str, a: str, b: str) -> str:
    return graph.node("Add", [a, b], name)


def add_max_pool(graph: GraphBuilder, name: str, x: str) -> str:
    """TorchVision's stem pool: 3x3, stride 2, padding 1 (ONNX pads never win a max, as torch's -inf padding)."""
    return graph.node("MaxPool", [x], name, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])


def add_global_avg_pool(graph: GraphBuilder, name: str, x: str) -> str:
    """(N, C, H, W) -> (N, C): GlobalAveragePool, then Flatten (TorchVision's avgpool and torch.flatten(x, 1))."""
    pooled = graph.node("GlobalAveragePool", [x], f"{name}.pooled")  # (N, C, 1, 1)
    return graph.node("Flatten", [pooled], name, axis=1)  # (N, C)


def add_gemm(graph: GraphBuilder, name: str, x: str, weight: np.ndarray, bias: np.ndarray, output: str | None = None) -> str:
    """Linear: x (N, D) @ weight (K, D).T + bias (K,) -> (N, K); initializers `name`.weight, `name`.bias."""
    w = graph.initializer(f"{name}.weight", weight)
    b = graph.initializer(f"{name}.bias", bias)
    return graph.node("Gemm", [x, w, b], output or name, name=name, transB=1)


# conv(graph, name, x, weight, bias, stride, padding, groups) -> output name: add_conv's signature.
ConvFn = Callable[[GraphBuilder, str, str, np.ndarray, np.ndarray, int, int, int], str]
# linear(graph, name, x, weight, bias, output=None) -> output name: add_gemm's signature.
LinearFn = Callable[..., str]


def resnet_graph(
    graph: GraphBuilder,
    spec: ResNetSpec,
    folded_conv: Callable[[ConvSpec], tuple[np.ndarray, np.ndarray]],
    fc: tuple[np.ndarray, np.ndarray],
    *,
    conv: ConvFn = add_conv,
    linear: LinearFn = add_gemm,
) -> dict[str, str]:
    """Append the forward pass of `spec` to `graph`, reading tensor `INPUT_NAME`; return {output: tensor name}.

    folded_conv(c) gives conv c's weight and bias with its batch norm folded in; fc is (weight, bias).
    Every convolution goes through `conv`, the fc layer through `linear` (both replaceable, see the module doc).
    The outputs are "layer1".."layer4" and "logits", named so in the graph.
    """

    def conv_bn(c: ConvSpec, x: str) -> str:
        weight, bias = folded_conv(c)
        return conv(graph, c.conv, x, weight, bias, c.stride, c.padding, c.groups)

    def conv_relu(c: ConvSpec, x: str, relu_name: str) -> str:
        return add_relu(graph, relu_name, conv_bn(c, x))

    stem = stem_conv(spec)
    h = conv_relu(stem, INPUT_NAME, "relu")  # (N, 64, H/2, W/2)
    if spec.stem == IMAGENET_STEM:
        h = add_max_pool(graph, "maxpool", h)  # (N, 64, H/4, W/4)
    outputs: dict[str, str] = {}
    blocks = list(spec.blocks())
    for i, b in enumerate(blocks):
        stage = b.prefix.split(".")[0]  # "layer1"
        last_of_stage = i + 1 == len(blocks) or blocks[i + 1].prefix.split(".")[0] != stage
        convs = block_convs(b)
        identity = conv_bn(convs["downsample"], h) if "downsample" in convs else h
        roles = [r for r in ("conv1", "conv2", "conv3") if r in convs]
        out = h
        for role in roles[:-1]:
            out = conv_relu(convs[role], out, f"{b.prefix}.relu{role[-1]}")
        out = conv_bn(convs[roles[-1]], out)
        out = add_add(graph, f"{b.prefix}.add", out, identity)
        # The stage's output tensor is named after the stage, so that it can be a graph output.
        h = add_relu(graph, stage if last_of_stage else f"{b.prefix}.relu", out)
        if last_of_stage:
            outputs[stage] = h
    pooled = add_global_avg_pool(graph, "avgpool", h)  # (N, 512 * expansion)
    outputs[LOGITS_NAME] = linear(graph, "fc", pooled, fc[0], fc[1], output=LOGITS_NAME)  # (N, num_classes)
    return outputs


# --- the model: inputs, outputs, shapes, metadata ----------------------------------------------------------------


def feature_sizes(spec: ResNetSpec, height: int, width: int) -> dict[str, tuple[int, int]]:
    """(H, W) of layer1..layer4 for an input of height x width (the output-size formula, stage by stage)."""
    stem = stem_conv(spec)

    def out(h: int, w: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
        return F.conv_output_size(h, kernel, stride, padding), F.conv_output_size(w, kernel, stride, padding)

    h, w = out(height, width, stem.kernel_size, stem.stride, stem.padding)
    if spec.stem == IMAGENET_STEM:
        h, w = out(h, w, 3, 2, 1)
    sizes = {}
    for stage, name in enumerate(FEATURE_OUTPUTS):
        if stage > 0:
            h, w = out(h, w, 3, 2, 1)  # the stride-2 3x3 conv of the stage's first block
        sizes[name] = (h, w)
    return sizes


def _batch_dim(batch: int | str):
    if batch == DYNAMIC:
        return "batch"
    if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive integer or {DYNAMIC!r}, not {batch!r}")
    return int(batch)


def _spatial_size(size) -> tuple[int, int] | None:
    if size == DYNAMIC:
        return None
    try:
        height, width = size
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width) or {DYNAMIC!r}, not {size!r}") from None
    for value in (height, width):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"size must be two positive integers (height, width) or {DYNAMIC!r}, not {size!r}")
    return int(height), int(width)


def metadata(model: Any) -> dict[str, str]:
    """What a deployment needs beside the graph, as ONNX metadata_props (strings; lists as JSON)."""
    preset = preset_for(model)
    spec = model.spec
    props = {
        "arch": spec.name,
        "num_classes": str(spec.num_classes),
        "stem": spec.stem,
        "classes": json.dumps(model.meta.get("classes") or labels_for(model)),
        "mean": json.dumps(list(preset.mean)),
        "std": json.dumps(list(preset.std)),
        "crop_size": str(preset.crop_size),
        "resize_size": str(preset.resize_size),
        "interpolation": preset.interpolation,
        "input": "RGB, (N, 3, H, W) float32: pixels / 255, then (x - mean) / std per channel; "
        "TorchVision's preset resizes the shorter side to resize_size, then center-crops crop_size",
        "batch_norm": "folded into each convolution's weight and bias, in float64, then rounded to float32",
    }
    for key in ("weights", "source", "source_sha256"):
        if key in model.meta:
            props[key] = str(model.meta[key])
    return props


def folded_parameters(state: Mapping[str, np.ndarray], dtype=np.float32) -> Callable[[ConvSpec], tuple[np.ndarray, np.ndarray]]:
    """c -> conv c's (weight, bias) with its batch norm folded in float64, then rounded once to `dtype`."""

    def fold(c: ConvSpec) -> tuple[np.ndarray, np.ndarray]:
        weight, bias = F.fold_batch_norm(
            state[f"{c.conv}.weight"],
            state[f"{c.bn}.running_mean"],
            state[f"{c.bn}.running_var"],
            state[f"{c.bn}.weight"],
            state[f"{c.bn}.bias"],
        )
        return weight.astype(dtype), bias.astype(dtype)

    return fold


def build_onnx_model(
    model: Any,
    *,
    features: bool = False,
    opset: int = DEFAULT_OPSET,
    batch: int | str = DYNAMIC,
    size: tuple[int, int] | str = DYNAMIC,
    conv: ConvFn = add_conv,
    linear: LinearFn = add_gemm,
    folded_conv: Callable[[ConvSpec], tuple[np.ndarray, np.ndarray]] | None = None,
    fc: tuple[np.ndarray, np.ndarray] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
):
    """An onnx.ModelProto of `model` (a ResNet), not yet checked (serialize_checked does that).

    features: also output layer1..layer4 (C2-C5). opset: the ONNX opset (13 or newer).
    batch: a fixed batch size or "dynamic"; size: a fixed (height, width) or "dynamic".
    conv, linear, folded_conv, fc, extra_metadata: for variants of the export (see the module doc).
    """
    onnx = require_onnx()
    helper = onnx.helper
    if not isinstance(opset, (int, np.integer)) or not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise DataError(
            f"opset must be an integer from {MIN_OPSET} to {onnx.defs.onnx_opset_version()} "
            f"(the newest this onnx package knows), not {opset!r}"
        )
    batch_dim = _batch_dim(batch)
    fixed_size = _spatial_size(size)
    spec = model.spec
    if folded_conv is None or fc is None:
        state = model._state  # read only; state_dict() would copy every tensor first
        folded_conv = folded_conv or folded_parameters(state)
        fc = fc or (state["fc.weight"].astype(np.float32), state["fc.bias"].astype(np.float32))
    graph = GraphBuilder(onnx)
    outputs = resnet_graph(graph, spec, folded_conv, fc, conv=conv, linear=linear)

    float32 = onnx.TensorProto.FLOAT
    height, width = fixed_size or ("height", "width")
    sizes = feature_sizes(spec, *fixed_size) if fixed_size else {}
    channels = {name: planes * spec.expansion for name, planes in zip(FEATURE_OUTPUTS, (64, 128, 256, 512))}
    output_infos = [helper.make_tensor_value_info(outputs[LOGITS_NAME], float32, [batch_dim, spec.num_classes])]
    if features:
        output_infos += [
            helper.make_tensor_value_info(outputs[name], float32, [batch_dim, channels[name], *sizes.get(name, (None, None))])
            for name in FEATURE_OUTPUTS
        ]
    graph_proto = helper.make_graph(
        graph.nodes,
        f"npresnet_{spec.name}",
        [helper.make_tensor_value_info(INPUT_NAME, float32, [batch_dim, 3, height, width])],
        output_infos,
        doc_string=f"{spec.name} ({spec.num_classes} classes), exported by npresnet; batch norm folded into the convolutions",
    )
    opset_imports = [helper.make_opsetid("", int(opset))]
    from . import __version__

    proto = helper.make_model(
        graph_proto,
        opset_imports=opset_imports,
        producer_name="npresnet",
        producer_version=__version__,
        # The oldest IR version that carries this opset, so that older runtimes (mobile, embedded) load the file.
        ir_version=helper.find_min_ir_version_for(opset_imports),
    )
    # Added after make_model, which copies the graph: the weights are copied once, not twice.
    proto.graph.initializer.extend(graph.initializers)
    helper.set_model_props(proto, {**metadata(model), **(extra_metadata or {})})
    return proto


def serialize_checked(proto) -> bytes:
    """The model's bytes, after onnx.checker's full check (with shape inference) of those very bytes.

    Checking the bytes rather than the ModelProto serializes once instead of twice (1 s per 100 MB here).
    """
    onnx = require_onnx()
    data = proto.SerializeToString()
    onnx.checker.check_model(data, full_check=True)
    return data


def export_onnx(
    model: Any,
    path: str | os.PathLike,
    *,
    features: bool = False,
    opset: int = DEFAULT_OPSET,
    batch: int | str = DYNAMIC,
    size: tuple[int, int] | str = DYNAMIC,
):
    """Write `model` (a ResNet, or a QuantizedResNet as a QDQ graph) to `path` as ONNX, checked by
    onnx.checker (full check), atomically; return the onnx.ModelProto.

    Outputs "logits" (N, num_classes), and with features=True also "layer1".."layer4".
    Batch and spatial axes are dynamic unless batch (an int) or size ((height, width)) fix them.
    """
    if getattr(model, "quantized", False):  # an int8 model (quantization.py): the QDQ graph below
        proto = build_qdq_model(model, features=features, opset=opset, batch=batch, size=size)
    else:
        proto = build_onnx_model(model, features=features, opset=opset, batch=batch, size=size)
    data = serialize_checked(proto)
    atomic_write(path, lambda f: f.write(data))
    return proto


# --- int8: the QDQ graph of a quantized model (quantization.py) --------------------------------------------------
#
# The same walk (resnet_graph), its conv and linear wrapped: each gets QuantizeLinear -> DequantizeLinear
# on its input, its int8 weight (per output channel, axis 0) and int32 bias through DequantizeLinear, and
# (a conv) QuantizeLinear -> DequantizeLinear on its output; onnxruntime fuses such a group into
# QLinearConv. Add, Relu, MaxPool and GlobalAveragePool stay float, between dequantized values, exactly
# as QuantizedResNet computes them, so that the two agree. Initializers carry the .npz's names
# (layer1.0.conv1.weight_quantized, .weight_scale, .input_scale, ...), plus the zero points ONNX wants.


def add_quantize_dequantize(graph: GraphBuilder, name: str, x: str, scale: np.ndarray, dtype: np.dtype) -> str:
    """QuantizeLinear -> DequantizeLinear of x, per tensor, zero point 0 of `dtype`; the result is named `name`.

    Initializers `name`_scale (float32 scalar) and `name`_zero_point (a scalar of `dtype`, the quantized type).
    """
    s = graph.initializer(f"{name}_scale", np.asarray(scale, dtype=np.float32))
    z = graph.initializer(f"{name}_zero_point", np.zeros((), dtype=dtype))
    q = graph.node("QuantizeLinear", [x, s, z], f"{name}_quantized")
    return graph.node("DequantizeLinear", [q, s, z], name)


def add_dequantized_initializer(graph: GraphBuilder, name: str, values: np.ndarray, scale: np.ndarray) -> str:
    """An integer initializer `name`_quantized, per-axis (axis 0) `name`_scale, zero points 0: DequantizeLinear -> `name`."""
    q = graph.initializer(f"{name}_quantized", values)
    s = graph.initializer(f"{name}_scale", np.asarray(scale, dtype=np.float32))
    z = graph.initializer(f"{name}_zero_point", np.zeros(values.shape[0], dtype=values.dtype))
    return graph.node("DequantizeLinear", [q, s, z], name, axis=0)


def qdq_conv(model: Any) -> ConvFn:
    """add_conv for `model` (a QuantizedResNet): the int8 conv named `name`, its input and output quantized."""

    def conv(graph: GraphBuilder, name: str, x: str, weight, bias, stride: int, padding: int, groups: int) -> str:
        q = model.convs[name]
        x = add_quantize_dequantize(graph, f"{name}.input", x, q.input_scale, q.input_dtype)
        w = add_dequantized_initializer(graph, f"{name}.weight", q.weight, q.weight_scale)
        b = add_dequantized_initializer(graph, f"{name}.bias", q.bias, q.bias_scale)
        R, S = q.weight.shape[2:]
        y = graph.node(
            "Conv", [x, w, b], f"{name}.output_float", name=name, kernel_shape=[R, S], strides=[stride, stride],
            pads=[padding, padding, padding, padding], dilations=[1, 1], group=groups,
        )
        # uint8 where a ReLU follows: the quantizer clips at 0, so the Relu after it changes nothing.
        return add_quantize_dequantize(graph, f"{name}.output", y, q.output_scale, q.output_dtype)

    return conv


def qdq_gemm(model: Any) -> LinearFn:
    """add_gemm for `model` (a QuantizedResNet): int8 fc weights, int32 bias, the input quantized; logits float."""

    def linear(graph: GraphBuilder, name: str, x: str, weight, bias, output: str | None = None) -> str:
        q = model.convs[name]
        x = add_quantize_dequantize(graph, f"{name}.input", x, q.input_scale, q.input_dtype)
        w = add_dequantized_initializer(graph, f"{name}.weight", q.weight, q.weight_scale)
        b = add_dequantized_initializer(graph, f"{name}.bias", q.bias, q.bias_scale)
        return graph.node("Gemm", [x, w, b], output or name, name=name, transB=1)

    return linear


def build_qdq_model(model: Any, **options):
    """The QDQ onnx.ModelProto of `model` (a QuantizedResNet); options as build_onnx_model's."""
    meta = model.meta
    return build_onnx_model(
        model,
        conv=qdq_conv(model),
        linear=qdq_gemm(model),
        folded_conv=lambda c: (None, None),  # the wrappers read the int8 parameters themselves
        fc=(None, None),
        extra_metadata={
            "batch_norm": "folded into each convolution (float64) before its weights were quantized",
            "quantization": (
                "int8 QDQ (QuantizeLinear/DequantizeLinear): weights int8 symmetric per output channel, biases "
                "int32 (scale input_scale * weight_scale), activations per tensor (uint8 after ReLU, int8 "
                f"otherwise, zero point 0); calibrated by npresnet, method {meta.get('method')}, "
                f"{meta.get('samples')} images"
            ),
        },
        **options,
    )
