"""The training pass: the loss of a batch and its gradient for every trainable parameter.

``value_and_grad(model, x, labels)`` runs the network forward without folding batch
norm (batch statistics in training mode, running ones in inference mode), keeping
only what each op's backward needs, then walks the same blocks in reverse, calling
the gradients that sit beside each forward op in ``functional.py``. The network's
structure comes from the same specs the forward pass uses (``block_convs``,
``stem_conv``); nothing of the architecture is repeated here.

What is kept per convolution + batch norm: the convolution's input (which is the
previous ReLU's output, so it also serves as that ReLU's mask) and the normalised
x_hat; everything else is freed as soon as the next op has read it, and each
block's saved arrays are dropped once its backward has run.

Frozen stages (``model.freeze``) run first, as the ordinary inference forward on the
model's own backend: no gradient is computed below the first trainable stage.

The ops come from one table, ``TrainingOps``, picked by the model's backend in
``training_ops``: the NumPy reference ops of ``functional.py`` by default (on
(N, C, H, W) arrays laid out channel by channel), or a compiled table that owns its
activation layout (the numba backend's, NHWC: ``npresnet_kernels.train``), which is
tested against this one.

Reference: PyTorch autograd on TorchVision's ``models/resnet.py`` in train() and
eval() mode, which the tests compare with, gradient by gradient.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable

import numpy as np

from . import functional as F
from .backends import Backend
from .model import ResNet
from .specs import IMAGENET_STEM, STAGES, BlockSpec, ConvSpec, block_convs, stem_conv

BN_MOMENTUM = 0.1  # torch.nn.BatchNorm2d's default


class TrainingOps:
    """The ops a training pass calls: here the NumPy reference ops of ``functional.py``, on
    (N, C, H, W) arrays laid out channel by channel (F.to_channel_major).

    A compiled table subclasses this with the same signatures over its own activation layout
    (between from_numpy and the pooled (N, C) features); per-channel arrays are (C,) in every
    layout, and the pass itself only adds activations of one shape.
    """

    def __init__(self, backend: Backend | None = None):
        self.backend = backend

    def running(self) -> contextlib.AbstractContextManager:
        """The context a whole training pass runs in: its backend's (Backend.running)."""
        return contextlib.nullcontext() if self.backend is None else self.backend.running()

    def from_numpy(self, x: np.ndarray) -> Any:
        # (N, C, H, W) laid out channel by channel, as im2col's matrix product writes each conv's
        # output; the functional ops keep that layout all the way through the pass and back.
        return F.to_channel_major(x)

    def conv2d(self, x, weight, stride, padding, groups):
        return F.conv2d(x, weight, stride=stride, padding=padding, groups=groups)

    def conv2d_backward(self, grad_out, x, weight, stride, padding, groups, input_grad=True):
        return F.conv2d_backward(grad_out, x, weight, stride, padding, groups, input_grad=input_grad)

    def batch_norm_train(self, x, running_mean, running_var, weight, bias, momentum):
        """As F.batch_norm_train; x's memory becomes the saved x_hat (the pass does not read x again)."""
        return F.batch_norm_train(x, running_mean, running_var, weight, bias, momentum, inplace=True)

    def batch_norm_eval(self, x, running_mean, running_var, weight, bias):
        return F.batch_norm_eval(x, running_mean, running_var, weight, bias)

    def batch_norm_backward(self, grad_out, saved, weight):
        """As F.batch_norm_backward; may reuse the saved arrays' memory (they are not read again)."""
        return F.batch_norm_backward(grad_out, saved, weight, inplace=True)

    def relu_(self, x):
        """ReLU in place."""
        return F.relu(x, out=x)

    def relu_backward_(self, grad_out, out):
        """relu_backward in place on grad_out."""
        return F.relu_backward(grad_out, out, inplace=True)

    def max_pool2d(self, x):
        """The ImageNet stem's max pool: (out, saved for max_pool2d_backward)."""
        out, indices = F.max_pool2d_with_indices(x, 3, 2, 1)
        return out, (indices, x.shape)

    def max_pool2d_backward(self, grad_out, saved):
        return F.max_pool2d_backward(grad_out, *saved)

    def linear(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def linear_backward(self, grad_out, x, weight):
        return F.linear_backward(grad_out, x, weight)

    def global_avg_pool(self, x) -> np.ndarray:
        return F.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], x.shape[1])  # (N, C)

    def global_avg_pool_backward(self, grad_out: np.ndarray, x):
        grad_x = np.empty_like(x)  # in x's layout, as every gradient of the pass
        grad_x[...] = F.adaptive_avg_pool2d_backward(grad_out.reshape(*grad_out.shape, 1, 1), x.shape)
        return grad_x


# backend name -> TrainingOps factory(backend); optional ones register on import (register_training_ops).
_TRAINING_OPS: dict[str, Callable[[Backend], TrainingOps]] = {}
_OPTIONAL_TRAINING_OPS = {"numba": "npresnet_kernels.train"}


def register_training_ops(backend_name: str, factory: Callable[[Backend], TrainingOps]) -> None:
    """Let models on backend `backend_name` train with `factory(backend)`'s ops."""
    _TRAINING_OPS[backend_name] = factory


def training_ops(backend: Backend) -> TrainingOps:
    """The training ops for a model's backend: its compiled table where there is one, else the NumPy reference."""
    name = backend.name
    if name not in _TRAINING_OPS and name in _OPTIONAL_TRAINING_OPS:
        importlib.import_module(_OPTIONAL_TRAINING_OPS[name])  # its backend exists, so its compiler imports
    return _TRAINING_OPS.get(name, TrainingOps)(backend)


class _Pass:
    """One training pass over a model: its parameters in the input's dtype, the batch-norm mode,
    the ops, and the gradients gathered on the way back."""

    def __init__(self, model: ResNet, dtype: np.dtype, ops: TrainingOps):
        self.model = model
        self.dtype = dtype
        self.ops = ops
        self.state = model._state
        self.grads: dict[str, np.ndarray] = {}

    def param(self, key: str) -> np.ndarray:
        return self.state[key].astype(self.dtype, copy=False)

    def conv_bn(self, x: np.ndarray, c: ConvSpec) -> tuple[np.ndarray, Any]:
        """batch_norm(conv2d(x)) -> (out (N, K, P, Q), saved for conv_bn_backward)."""
        s, bn = self.state, c.bn
        z = self.ops.conv2d(x, self.param(f"{c.conv}.weight"), c.stride, c.padding, c.groups)
        if self.model.training:
            out, bn_saved = self.ops.batch_norm_train(
                z, s[f"{bn}.running_mean"], s[f"{bn}.running_var"], s[f"{bn}.weight"], s[f"{bn}.bias"], BN_MOMENTUM
            )
            self.model._num_batches_tracked[bn] += 1
        else:
            out, bn_saved = self.ops.batch_norm_eval(z, s[f"{bn}.running_mean"], s[f"{bn}.running_var"], s[f"{bn}.weight"], s[f"{bn}.bias"])
        return out, (x, bn_saved)

    def conv_bn_backward(self, grad_out: np.ndarray, c: ConvSpec, saved, input_grad: bool = True) -> np.ndarray | None:
        """Gradient with respect to conv_bn's input; the parameters' gradients go to self.grads."""
        x, bn_saved = saved
        grad_z, self.grads[f"{c.bn}.weight"], self.grads[f"{c.bn}.bias"] = self.ops.batch_norm_backward(
            grad_out, bn_saved, self.param(f"{c.bn}.weight")
        )
        del bn_saved, saved
        grad_x, self.grads[f"{c.conv}.weight"] = self.ops.conv2d_backward(
            grad_z, x, self.param(f"{c.conv}.weight"), c.stride, c.padding, c.groups, input_grad=input_grad
        )
        return grad_x

    def block(self, x: np.ndarray, b: BlockSpec) -> tuple[np.ndarray, dict[str, Any]]:
        """One residual block, as model.residual_block but unfolded: relu(convs(x) + identity)."""
        convs = block_convs(b)
        roles = [r for r in ("conv1", "conv2", "conv3") if r in convs]
        saved: dict[str, Any] = {}
        h = x
        for role in roles[:-1]:
            h, saved[role] = self.conv_bn(h, convs[role])
            self.ops.relu_(h)  # (N, width, P, Q): the next conv's input, kept as its ReLU mask
        out, saved[roles[-1]] = self.conv_bn(h, convs[roles[-1]])
        if "downsample" in convs:
            identity, saved["downsample"] = self.conv_bn(x, convs["downsample"])
            out += identity
            del identity
        else:
            out += x
        self.ops.relu_(out)  # (N, outplanes, P, Q)
        return out, saved

    def block_backward(
        self, grad_out: np.ndarray, out: np.ndarray, b: BlockSpec, saved: dict[str, Any], input_grad: bool
    ) -> np.ndarray | None:
        """Gradient with respect to the block's input x, given the gradient at its output `out`.

        Consumes `saved`. input_grad=False (the first trainable block) skips the input's gradient.
        """
        convs = block_convs(b)
        roles = [r for r in ("conv1", "conv2", "conv3") if r in convs]
        grad = self.ops.relu_backward_(grad_out, out)  # reaches both the last conv and the identity
        grad_h = grad
        for i in reversed(range(len(roles))):
            role = roles[i]
            conv_input = saved[role][0]  # for i > 0: the output of the ReLU after roles[i - 1]
            grad_h = self.conv_bn_backward(grad_h, convs[role], saved.pop(role), input_grad=i > 0 or input_grad)
            if i > 0:
                self.ops.relu_backward_(grad_h, conv_input)
            del conv_input
        if not input_grad:
            if "downsample" in convs:
                self.conv_bn_backward(grad, convs["downsample"], saved.pop("downsample"), input_grad=False)
            return None
        if "downsample" in convs:
            grad_h += self.conv_bn_backward(grad, convs["downsample"], saved.pop("downsample"))
        else:
            grad_h += grad
        return grad_h  # (N, inplanes, H, W)


def value_and_grad(
    model: ResNet,
    x: np.ndarray,
    labels: np.ndarray,
    label_smoothing: float = 0.0,
    return_logits: bool = False,
):
    """The mean cross-entropy of `model` on (x, labels) and its gradient for every trainable parameter.

    x: (N, 3, H, W) float32 or float64; labels: (N,) integer class indices.
    Returns (loss, grads), or (loss, grads, logits) with return_logits=True: loss a Python float
    (torch's cross_entropy, mean reduction, label_smoothing as torch defines it); grads
    {TorchVision key name: array} for each parameter of the trainable stages (conv and batch-norm
    weights and biases, fc), in x's dtype; logits (N, num_classes) of this same forward pass.

    In training mode (model.train()) batch norm uses batch statistics and updates its running
    statistics and num_batches_tracked, as torch's forward does; in inference mode it uses the
    running statistics and changes nothing. Frozen stages run in inference mode either way.
    """
    x = model._check_input(x)
    dtype = x.dtype
    labels = np.asarray(labels)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), one per image, got {labels.shape}")
    spec = model.spec
    frozen = model.frozen
    first_trainable = 0 if frozen is None else STAGES.index(frozen) + 1  # index into STAGES; 5: only fc
    run = _Pass(model, dtype, training_ops(model.backend))
    ops = run.ops

    with ops.running():  # the Numba backend keeps the calling thread on a CPU of its own, as in a forward pass
        # Forward, keeping what the backward needs.
        if first_trainable == 0:
            stem = stem_conv(spec)
            stem_out, stem_saved = run.conv_bn(ops.from_numpy(x), stem)
            ops.relu_(stem_out)  # (N, 64, H/2, W/2)
            h = stem_out
            if spec.stem == IMAGENET_STEM:
                h, pool_saved = ops.max_pool2d(stem_out)  # (N, 64, H/4, W/4)
        else:
            h = ops.from_numpy(model._forward_frozen(x, frozen))
        trained_blocks = [b for b in spec.blocks() if STAGES.index(b.prefix.split(".")[0]) >= first_trainable]
        tape = []  # (block spec, block input, saved)
        for b in trained_blocks:
            out, saved = run.block(h, b)
            tape.append((b, h, saved))
            h = out
        if model.training and first_trainable < len(STAGES):
            model.invalidate(STAGES[first_trainable:])  # their running statistics changed
        pooled = ops.global_avg_pool(h)  # (N, num_features)
        logits = ops.linear(pooled, run.param("fc.weight"), run.param("fc.bias"))  # (N, num_classes)
        loss, grad_logits = F.cross_entropy(logits, labels, label_smoothing)

        # Backward.
        grad_pooled, run.grads["fc.weight"], run.grads["fc.bias"] = ops.linear_backward(grad_logits, pooled, run.param("fc.weight"))
        if tape:
            grad_h = ops.global_avg_pool_backward(grad_pooled, h)
            out = h
            while tape:
                b, block_input, saved = tape.pop()
                input_grad = bool(tape) or first_trainable == 0
                grad_h = run.block_backward(grad_h, out, b, saved, input_grad)
                out = block_input
                del saved, block_input
            if first_trainable == 0:
                if spec.stem == IMAGENET_STEM:
                    grad_h = ops.max_pool2d_backward(grad_h, pool_saved)
                ops.relu_backward_(grad_h, stem_out)
                del stem_out, out
                run.conv_bn_backward(grad_h, stem, stem_saved, input_grad=False)
    grads = {k: run.grads[k].astype(dtype, copy=False) for k in model.parameters(trainable=True)}
    if return_logits:
        return loss, grads, logits
    return loss, grads
