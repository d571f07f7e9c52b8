"""The ResNet forward pass, as functions of (input, parameters, backend ops).

The network's structure comes from a ``ResNetSpec`` (``specs.py``); its
parameters are a state dict under TorchVision's key names (``weights.py``).
At first use in a dtype, every conv + batch norm pair (the batch norm as a scale
and a bias, ``ConvBatchNorm``) is handed to the backend to prepare, which folds
the scale into the weights or applies it after the sum; the forward pass then
calls only the backend's ops (``backends.py``). Anything that changes
parameters or running statistics in place (an optimizer step, a training-mode
pass) calls ``invalidate`` so that the next forward folds them afresh.
A backend that keeps each convolution's weights unfolded in its prepared form
(``Backend.keeps_weights``: the Numba backend's packed panels) holds the only copy
of them while that form lives; the model gets them back from it, bit for bit,
whenever they are asked for (``state_dict``, training, an optimizer), so that a
process running one model holds its weights once, not twice.

Training (``autograd.py``) runs its own unfolded forward and backward over the
same specs; the model holds the training state torch's modules hold: the mode
(``train``/``eval``), the frozen stages and each batch norm's num_batches_tracked.

Reference: TorchVision ``models/resnet.py`` (``BasicBlock``, ``Bottleneck``,
``ResNet._forward_impl``), whose outputs these match.
"""
from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from . import functional as F
from .backends import Backend, ConvBatchNorm, get_backend
from .hub import fetch, is_weights_name
from .manifest import WeightsEntry
from .specs import (
    IMAGENET_STEM,
    STAGES,
    ConvSpec,
    ResNetSpec,
    all_convs,
    block_convs,
    count_params,
    get_spec,
    is_parameter,
    parameter_shapes,
    stage_of,
    stem_conv,
)
from .errors import WeightsError
from .formats import read_weights
from .weights import infer_spec_from_state, save_npz, validate_state_dict

FEATURE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")


def _stage_index(stage: str) -> int:
    """Position of a stage in the forward pass: "stem" 0, "layer1".."layer4" 1-4, "fc" 5."""
    return len(STAGES) if stage == "fc" else STAGES.index(stage)


@dataclass
class PreparedNet:
    """A network's parameters folded and prepared by one backend, for one dtype."""

    stem: Any
    max_pool: bool
    stages: list[list[dict[str, Any]]]  # stage -> block -> role ("conv1", ..., "downsample") -> prepared conv
    fc: Any  # None in a frozen prefix's copy


def residual_block(x, block: Mapping[str, Any], ops: Backend):
    """BasicBlock (conv1, conv2) or Bottleneck (conv1, conv2, conv3), batch norms folded in.

    out = relu(last_conv(...relu(conv1(x))...) + identity), identity = downsample(x) or x.
    """
    identity = ops.conv(x, block["downsample"], relu=False) if "downsample" in block else x
    roles = [r for r in ("conv1", "conv2", "conv3") if r in block]
    out = x
    for role in roles[:-1]:
        out = ops.conv(out, block[role], relu=True)
    return ops.conv(out, block[roles[-1]], relu=True, residual=identity)


def check_input(x) -> np.ndarray:
    """x as a contiguous (N, 3, H, W) float32 or float64 array, or a TypeError/ValueError saying what it is."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"input must be a NumPy array of shape (N, 3, H, W), not {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"input must have shape (N, 3, H, W), got {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"input dtype must be float32 or float64, got {x.dtype}")
    if min(x.shape[0], x.shape[2], x.shape[3]) < 1:
        raise ValueError(f"input has an empty dimension: {x.shape}")
    return np.ascontiguousarray(x)


def random_state_dict(spec: ResNetSpec, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Fresh parameters initialised as TorchVision does.

    Convolutions: Kaiming normal (fan_out, ReLU gain); batch norm: weight 1, bias 0,
    running mean 0, running variance 1; fc: uniform(+-1/sqrt(in_features)).
    """
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in parameter_shapes(spec).items():
        if key.startswith("fc."):
            bound = 1.0 / np.sqrt(spec.num_features)
            value = rng.uniform(-bound, bound, size=shape)
        elif key.endswith("running_var") or (len(shape) == 1 and key.endswith(".weight")):
            value = np.ones(shape)
        elif len(shape) == 1:
            value = np.zeros(shape)
        else:
            fan_out = shape[0] * shape[2] * shape[3]
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_out)
        state[key] = value.astype(dtype)
    return state


class SpecProperties:
    """What a network's spec says of it, for the float ResNet and its int8 form (QuantizedResNet) alike."""

    spec: ResNetSpec

    @property
    def arch(self) -> str:
        return self.spec.name

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def num_params(self) -> int:
        """Learnable parameters of the float network, as TorchVision counts them (e.g. 11,689,512 for resnet18)."""
        return count_params(self.spec)


class ResNet(SpecProperties):
    """A ResNet of the TorchVision family: parameters, a backend, and the forward pass.

    model(x) -> logits (N, num_classes); model.features(x) -> the multi-scale maps.
    x is an (N, 3, H, W) float32 or float64 array; outputs have the same dtype.
    """

    def __init__(
        self,
        spec: ResNetSpec,
        state_dict: Mapping[str, np.ndarray] | None = None,
        *,
        backend: str | Backend = "auto",
        threads: int | None = None,
        meta: Mapping[str, Any] | None = None,
        source: str = "state dict",
        copy: bool = True,
    ):
        self.spec = spec
        if state_dict is None:
            state_dict, copy = random_state_dict(spec), False
        # Own, writeable arrays: training updates them in place, and the caller's arrays must not change.
        # copy=False takes the caller's writeable arrays as they are (load() does: nobody else holds what it
        # read, and a second copy of the weights would be the peak of a small process's memory).
        # A conv or fc weight is None here while only its prepared form holds it (see _prepare, _weights_held).
        self._params: dict[str, np.ndarray | None] = {
            k: v if not copy and isinstance(v, np.ndarray) and v.flags.writeable else np.array(v)
            for k, v in validate_state_dict(state_dict, spec, source).items()
        }
        # key -> (the array handed over, while anyone else still holds it; a function that rebuilds it)
        self._weights_held: dict[str, tuple[weakref.ref, Callable[[], np.ndarray]]] = {}
        # bn prefix -> batches seen in training mode (torch's num_batches_tracked), kept from the weights if present.
        self._num_batches_tracked = {c.bn: 0 for c in all_convs(spec)}
        for bn in self._num_batches_tracked:
            count = state_dict.get(f"{bn}.num_batches_tracked")
            if count is not None and np.size(count) == 1:
                self._num_batches_tracked[bn] = int(np.asarray(count).reshape(()))
        self.meta = dict(meta or {})
        self.backend = get_backend(backend, threads, spec=spec)
        # (dtype, last stage folded or None for the whole network) -> its folded, prepared copy
        self._prepared: dict[tuple[np.dtype, str | None], PreparedNet] = {}
        self.training = False
        self._frozen: str | None = None

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, state_dict, spec: ResNetSpec | None = None, **options) -> "ResNet":
        source = options.pop("source", "state dict")
        if spec is None:
            spec = infer_spec_from_state(state_dict, source)
        return cls(spec, state_dict, source=source, **options)

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the parameters under TorchVision's key names (unfolded), in torch's order,
        with each batch norm's num_batches_tracked (an int64 scalar) as torch saves it."""
        state = {}
        for k, v in self._params.items():
            state[k] = v.copy() if v is not None else self._held_weight(k)
            if k.endswith(".running_var"):
                bn = k[: -len(".running_var")]
                state[f"{bn}.num_batches_tracked"] = np.array(self._num_batches_tracked[bn], dtype=np.int64)
        return state

    @property
    def _state(self) -> dict[str, np.ndarray]:
        """The parameters and running statistics by name, the live arrays (training and the optimizers
        change them in place): the conv weights only the prepared network held are taken back first."""
        self._take_back_weights()
        return self._params  # type: ignore[return-value]

    def _take_back_weights(self) -> None:
        for key in list(self._weights_held):
            self._params[key] = self._held_weight(key)
            del self._weights_held[key]

    def _held_weight(self, key: str) -> np.ndarray:
        """A conv weight the prepared network holds: the array handed over if someone still holds
        it (and may have changed it in place), else the backend's exact copy."""
        handed_over, rebuild = self._weights_held[key]
        weight = handed_over()
        return weight if weight is not None else rebuild()

    def parameters(self, trainable: bool = True) -> dict[str, np.ndarray]:
        """The learnable parameters by name (torch's named_parameters), the live arrays, not copies.

        trainable=True leaves out the frozen stages. Whoever changes them in place calls invalidate().
        """
        return {
            k: v
            for k, v in self._state.items()
            if is_parameter(k) and not (trainable and self.is_frozen(stage_of(k)))
        }

    def use_backend(self, backend: str | Backend, threads: int | None = None) -> "ResNet":
        """Run on `backend` from the next call (its prepared weights made then). Returns the model."""
        backend = get_backend(backend, threads, spec=self.spec)
        self.invalidate()
        self.backend = backend
        return self

    def invalidate(self, stages: Iterable[str] | None = None) -> None:
        """Forget the folded, prepared copies: parameters or running statistics changed in place.

        stages: the stages ("stem", "layer1".."layer4", "fc") that changed, where the caller knows
        (an optimizer step, a training pass); the folded copy of a frozen prefix that none of them
        reaches is kept, so that a frozen backbone is folded once, not at every step. None: all.
        """
        self._take_back_weights()  # before the prepared network that holds them goes
        if stages is None:
            self._prepared.clear()
            return
        first = min((_stage_index(stage) for stage in stages), default=None)
        if first is None:
            return
        for dtype, through in list(self._prepared):
            if through is None or _stage_index(through) >= first:
                del self._prepared[dtype, through]

    # --- training state ------------------------------------------------------------------

    def train(self, mode: bool = True) -> "ResNet":
        """Training mode: batch norm normalises with batch statistics and updates its running ones
        (in npresnet.value_and_grad); frozen stages stay in inference mode. Returns the model."""
        self.training = bool(mode)
        return self

    def eval(self) -> "ResNet":
        """Inference mode (the default): batch norm uses its running statistics. Returns the model."""
        return self.train(False)

    @property
    def frozen(self) -> str | None:
        """The last frozen stage ("stem", "layer1".."layer4"), or None when everything trains."""
        return self._frozen

    def freeze(self, stage: str | None) -> "ResNet":
        """Freeze the network from the stem up to and including `stage`; None unfreezes everything.

        Frozen stages get no gradient (none is computed below the first trainable stage) and
        their batch norms stay in inference mode, running statistics untouched, even after
        train(), as torch does with requires_grad=False and those modules in eval(). Returns the model.
        """
        if stage is not None and stage not in STAGES:
            raise ValueError(f"cannot freeze {stage!r}: the stages are None, {', '.join(map(repr, STAGES))}")
        self._frozen = stage
        return self

    def is_frozen(self, stage: str) -> bool:
        """Whether `stage` ("stem", "layer1".."layer4", "fc") is frozen."""
        if self._frozen is None or stage == "fc":
            return False
        return STAGES.index(stage) <= STAGES.index(self._frozen)

    def replace_head(self, num_classes: int, seed: int = 0) -> "ResNet":
        """A new fc for `num_classes` classes, initialised as TorchVision's nn.Linear:
        weight and bias uniform in +-1/sqrt(in_features) (kaiming_uniform with a=sqrt(5)).
        Seeded (NumPy's default_rng(seed)); in the dtype of the old head. Returns the model."""
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be positive, not {num_classes}")
        num_classes = int(num_classes)
        rng = np.random.default_rng(seed)
        fan_in = self.spec.num_features
        bound = 1.0 / np.sqrt(fan_in)
        dtype = self._state["fc.weight"].dtype
        self._state["fc.weight"] = rng.uniform(-bound, bound, size=(num_classes, fan_in)).astype(dtype)
        self._state["fc.bias"] = rng.uniform(-bound, bound, size=num_classes).astype(dtype)
        self.spec = self.spec.replace(num_classes=num_classes)
        self.invalidate()
        return self

    def __repr__(self) -> str:
        return (
            f"ResNet(arch={self.spec.name!r}, num_classes={self.spec.num_classes}, stem={self.spec.stem!r}, "
            f"backend={self.backend.name!r}, num_params={self.num_params:,})"
        )

    # --- forward ------------------------------------------------------------------------

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, num_classes) for x (N, 3, H, W)."""
        return self._forward(x, keep_features=False)

    def features(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The maps a detection or FPN backbone needs, and the pooled embedding.

        Returns {"stem": (N, 64, H/2, W/2) after conv1/bn1/relu, "layer1".."layer4":
        strides 4, 8, 16, 32 with 64..512 x expansion channels, "pool": (N, 512 x expansion)}.
        (The CIFAR stem has stride 1, so every stride above is halved twice.)
        """
        return self._forward(x, keep_features=True)

    def _forward(self, x, keep_features: bool):
        x = self._check_input(x)
        ops = self.backend
        net = self._prepare(x.dtype)
        with ops.running():
            return self._run(ops, net, x, keep_features)

    # The activations ResNet.features returns, in the order _stages gives them.
    FEATURES = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")

    @staticmethod
    def _stages(ops: Backend, net, h) -> tuple:
        """The stem and the four stages on activation h, then the average pool: the activation after each,
        in FEATURES' order (the last, layer4's pooled, (N, 512 * expansion))."""
        h = ops.conv(h, net.stem, relu=True)  # (N, 64, H/2, W/2)
        outputs = [h]
        if net.max_pool:
            h = ops.max_pool(h)  # (N, 64, H/4, W/4)
        for blocks in net.stages:
            for block in blocks:
                h = residual_block(h, block, ops)
            outputs.append(h)
        return (*outputs, ops.global_avg_pool(h))

    @staticmethod
    def _classify(ops: Backend, net, h):
        """The whole network on activation h: the stages, the average pool, the fc: (N, num_classes) logits."""
        return ops.linear(ResNet._stages(ops, net, h)[-1], net.fc)

    @staticmethod
    def _run(ops: Backend, net, x: np.ndarray, keep_features: bool):
        h = ops.from_numpy(x)
        if keep_features:
            outputs = ops.run_network(ResNet._stages, net, h)
            return {name: ops.to_numpy(a) for name, a in zip(ResNet.FEATURES, outputs)}
        return ops.to_numpy(ops.run_network(ResNet._classify, net, h))  # (N, num_classes)

    def _forward_frozen(self, x: np.ndarray, stage: str) -> np.ndarray:
        """The inference-mode forward pass from the input through `stage` (a frozen prefix), on this
        model's backend with batch norms folded: nothing of it is needed for a backward pass."""
        ops = self.backend
        net = self._prepare(x.dtype, through=stage)
        with ops.running():
            h = ops.conv(ops.from_numpy(x), net.stem, relu=True)  # (N, 64, H/2, W/2)
            if net.max_pool:
                h = ops.max_pool(h)  # (N, 64, H/4, W/4)
            for blocks in net.stages:
                for block in blocks:
                    h = residual_block(h, block, ops)
            return ops.to_numpy(h)

    def _check_input(self, x) -> np.ndarray:
        return check_input(x)

    def _prepare(self, dtype: np.dtype, through: str | None = None) -> PreparedNet:
        """Fold every batch norm into its conv, in `dtype`, and let the backend prepare it (cached).

        through: fold only the stem and the stages up to this one (a frozen prefix; no fc), else all.
        """
        dtype = np.dtype(dtype)
        key = (dtype, through)
        if key not in self._prepared:
            ops = self.backend
            self._take_back_weights()  # from another prepared form, if one holds them
            s = self._params
            # The whole network's prepared form, in the weights' own dtype, on a backend that keeps them
            # unfolded, becomes their only holder: each is handed over as soon as its conv (or the fc) is prepared.
            hand_over = through is None and ops.keeps_weights

            def keep_only_prepared(key: str, prepared: Any, rebuild: Callable[[Any], np.ndarray]) -> None:
                if hand_over and s[key].dtype == dtype:
                    self._weights_held[key] = (weakref.ref(s[key]), functools.partial(rebuild, prepared))
                    s[key] = None

            def fold(c: ConvSpec):
                weight_key = f"{c.conv}.weight"
                weight = s[weight_key]
                # The batch norm alone, as y = conv * scale + bias: fold_batch_norm of a unit weight.
                scale, bias = F.fold_batch_norm(
                    np.ones((weight.shape[0], 1, 1, 1)),
                    s[f"{c.bn}.running_mean"],
                    s[f"{c.bn}.running_var"],
                    s[f"{c.bn}.weight"],
                    s[f"{c.bn}.bias"],
                )
                prepared = ops.prepare_conv_bn(
                    ConvBatchNorm(weight, scale.reshape(-1), bias, c.stride, c.padding, c.groups, dtype)
                )
                keep_only_prepared(weight_key, prepared, ops.conv_weight)
                return prepared

            num_stages = len(self.spec.layers) if through is None else STAGES.index(through)
            stages: list[list[dict[str, Any]]] = [[] for _ in range(num_stages)]
            for b in self.spec.blocks():
                if b.stage <= num_stages:
                    stages[b.stage - 1].append({role: fold(c) for role, c in block_convs(b).items()})
            fc = None
            if through is None:
                # (a copy unless it is handed over: a backend may keep the very array it is given)
                fc = ops.prepare_linear(s["fc.weight"].astype(dtype, copy=not hand_over), s["fc.bias"].astype(dtype))
                keep_only_prepared("fc.weight", fc, ops.linear_weight)
            self._prepared[key] = PreparedNet(
                stem=fold(stem_conv(self.spec)), max_pool=self.spec.stem == IMAGENET_STEM, stages=stages, fc=fc
            )
        return self._prepared[key]


def load(path: str | os.PathLike, **options) -> ResNet:
    """A model from a weights file, its architecture inferred from the keys and shapes."""
    state, meta = read_weights(path)
    if meta.get("quantized"):  # an int8 file from npresnet.quantize: its own network (quantization.py)
        from .quantization import QuantizedResNet

        return QuantizedResNet.from_state_dict(state, meta, source=str(path), **options)
    return ResNet.from_state_dict(state, source=str(path), meta=meta, copy=False, **options)


def save(model: ResNet, path: str | os.PathLike, dtype=None) -> None:
    """Write the model's parameters and architecture to an .npz (atomically); dtype="float16" for half the bytes."""
    meta = dict(model.meta)
    meta.update(arch=model.spec.name, num_classes=model.spec.num_classes, stem=model.spec.stem)
    save_npz(path, model.state_dict(), meta, dtype)


def build(
    arch: str | ResNetSpec,
    weights: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    num_classes: int | None = None,
    *,
    stem: str | None = None,
    backend: str | Backend = "auto",
    threads: int | None = None,
) -> ResNet:
    """A model of architecture `arch`, with `weights` (a file path, a state dict, or official weights:
    ResNet50_Weights.IMAGENET1K_V2 or a name such as "IMAGENET1K_V2" or "DEFAULT", fetched and cached)
    or fresh ones.

    num_classes defaults to the weights' head size (from fc.weight), else 1000.
    """
    spec = get_spec(arch, stem=stem)
    meta: dict[str, Any] = {}
    source = "state dict"
    if weights is None:
        state = None
        spec = spec.replace(num_classes=num_classes or spec.num_classes)
    else:
        if isinstance(weights, Mapping):
            state = dict(weights)
        else:
            if isinstance(weights, WeightsEntry):  # npresnet.ResNet50_Weights.IMAGENET1K_V2
                if weights.arch != spec.name:
                    raise WeightsError(f"{weights} are weights for {weights.arch}, not {spec.name}")
                weights = fetch(weights.arch, weights.name)
            elif is_weights_name(weights):
                weights = fetch(spec.name, weights)
            source = str(weights)
            state, meta = read_weights(weights)
            if meta.get("quantized"):
                return _build_quantized(spec, state, meta, source, num_classes, stem, backend=backend, threads=threads)
        inferred = infer_spec_from_state(state, source)
        if inferred.replace(name=spec.name, num_classes=spec.num_classes, stem=spec.stem) != spec:
            raise WeightsError(
                f"{source} holds weights for {_describe(inferred)}, not {_describe(spec)}; "
                f"use npresnet.load() to build the architecture the weights were made for"
            )
        spec = spec.replace(
            num_classes=num_classes if num_classes is not None else inferred.num_classes,
            stem=stem if stem is not None else inferred.stem,
        )
    # Arrays read from a file here belong to nobody else: the model takes them without a copy.
    return ResNet(spec, state, backend=backend, threads=threads, meta=meta, source=source, copy=source == "state dict")


def _build_quantized(spec, state, meta, source, num_classes, stem, **options):
    """An int8 file given to build(): its network, if it is the architecture asked for (its head is fixed)."""
    from .quantization import QuantizedResNet

    model = QuantizedResNet.from_state_dict(state, meta, source=source, **options)
    asked = spec.replace(num_classes=num_classes or model.num_classes, stem=stem or model.spec.stem)
    if model.spec.replace(name=spec.name) != asked:
        raise WeightsError(
            f"{source} holds int8 weights for {_describe(model.spec)} ({model.num_classes} classes, "
            f"stem {model.spec.stem}), not {_describe(asked)}; use npresnet.load() to run it as it is"
        )
    return model


def _describe(spec: ResNetSpec) -> str:
    if spec.name != "custom":
        return spec.name
    return f"a ResNet with {spec.block} blocks {spec.layers}, groups={spec.groups}, width_per_group={spec.width_per_group}"
