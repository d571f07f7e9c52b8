"""Optimizers and learning-rate schedules over a model's parameters, with torch.optim's formulas.

An optimizer holds parameter groups, as torch's do: each group a dict with the names of
its parameters ("params"), its learning rate and its other hyperparameters. ``step(grads)``
takes the gradients by name (``value_and_grad``'s dict), updates the model's arrays in
place and tells the model to refold them. Its state (momentum buffers, Adam moments,
step counts) is kept per parameter name, so ``state_dict()`` holds only arrays, numbers,
strings and lists/dicts of them: it saves to .npz + JSON.

The schedules set each group's "lr" per ``sched.step()`` exactly as
``torch.optim.lr_scheduler`` does, including its recursive (chainable) forms, so that
the learning rates agree to the last bit or so, not just to the closed formula.

References: ``torch.optim.SGD`` and ``torch.optim.AdamW`` (single-tensor code paths),
``torch.optim.lr_scheduler`` (CosineAnnealingLR, StepLR, LinearLR, SequentialLR);
Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (AdamW, 2019).
"""
from __future__ import annotations

import copy
import math
from bisect import bisect_right
from typing import Any, Iterable, Mapping

import numpy as np

from .model import ResNet
from .specs import STAGES, stage_of

GROUP_ORDER = (*STAGES, "fc")


class ParamGroups(list):
    """A list of parameter groups that remembers its model, so that SGD(param_groups(model, ...)) works."""

    def __init__(self, model: ResNet, groups: Iterable[dict[str, Any]]):
        super().__init__(groups)
        self.model = model


def param_groups(model: ResNet, lr: float, backbone_lr: float | None = None) -> ParamGroups:
    """One parameter group per stage: stem, layer1..layer4, fc, frozen stages left out.

    fc learns at `lr`, the backbone at `backbone_lr` (default `lr`); e.g. lr=1e-3 for a new
    head and backbone_lr=1e-4 for pretrained stages. Each group is {"name", "params", "lr"};
    the list remembers the model: pass it straight to SGD or AdamW.
    """
    backbone_lr = lr if backbone_lr is None else backbone_lr
    by_stage: dict[str, list[str]] = {}
    for name in model.parameters(trainable=True):
        by_stage.setdefault(stage_of(name), []).append(name)
    return ParamGroups(
        model,
        [
            {"name": stage, "params": by_stage[stage], "lr": lr if stage == "fc" else backbone_lr}
            for stage in GROUP_ORDER
            if stage in by_stage
        ],
    )


class Optimizer:
    """Parameter groups over a model's named arrays, and per-parameter state. Subclasses define _update."""

    defaults: dict[str, Any]

    def __init__(self, model: ResNet, params: Iterable[Mapping[str, Any]] | None, defaults: dict[str, Any]):
        if not isinstance(model, ResNet):
            raise TypeError(f"the optimizer's first argument must be a npresnet model, not {type(model).__name__}")
        self.model = model
        self.defaults = defaults
        if params is None:
            params = [{"params": list(model.parameters(trainable=True))}]
        known = model.parameters(trainable=False)
        self.param_groups: list[dict[str, Any]] = []
        seen: set[str] = set()
        for group in params:
            group = {**defaults, **dict(group)}
            group["params"] = list(group["params"])
            for name in group["params"]:
                if name not in known:
                    raise ValueError(f"{name!r} is not a learnable parameter of {model.arch}")
                if name in seen:
                    raise ValueError(f"{name!r} appears in more than one parameter group")
                seen.add(name)
            group.setdefault("initial_lr", group["lr"])
            self.param_groups.append(group)
        self.state: dict[str, dict[str, Any]] = {}

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """Update every parameter that has a gradient in `grads`, in place; others are untouched."""
        params = self.model._state
        updated = set()
        for group in self.param_groups:
            for name in group["params"]:
                grad = grads.get(name)
                if grad is None:
                    continue
                updated.add(stage_of(name))
                param = params[name]
                if grad.shape != param.shape:
                    raise ValueError(f"gradient for {name} has shape {grad.shape}, the parameter {param.shape}")
                self._update(param, grad.astype(param.dtype, copy=False), self.state.setdefault(name, {}), group)
        self.model.invalidate(updated)  # a frozen prefix stays folded

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _work_array(self, param: np.ndarray) -> np.ndarray:
        """A scratch array shaped like `param`: a view of one buffer as large as the largest parameter,
        shared by every update (each is done with it before the next begins)."""
        buffer = getattr(self, "_work", None)
        if buffer is None or buffer.size < param.size or buffer.dtype != param.dtype:
            size = max(p.size for p in self.model._state.values() if p.dtype == param.dtype)
            buffer = self._work = np.empty(max(size, param.size), dtype=param.dtype)
        return buffer[: param.size].reshape(param.shape)

    def state_dict(self) -> dict[str, Any]:
        """{"state": {name: {...}}, "param_groups": [...]}: copies, savable as .npz arrays + JSON."""
        return {"state": copy.deepcopy(self.state), "param_groups": copy.deepcopy(self.param_groups)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what state_dict() returned (possibly after a round trip through .npz + JSON)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            list(g["params"]) != s["params"] for g, s in zip(groups, self.param_groups)
        ):
            raise ValueError("optimizer state has different parameter groups than this optimizer")
        self.param_groups = [{**dict(g), "params": list(g["params"])} for g in groups]
        params = self.model._state
        self.state = {}
        for name, entry in state_dict["state"].items():
            self.state[name] = {
                k: np.array(v, dtype=params[name].dtype) if np.ndim(v) else (int(v) if k == "step" else v)
                for k, v in entry.items()
            }


class SGD(Optimizer):
    """torch.optim.SGD: with g = grad + weight_decay * p, and momentum,
    buf = g (first step) else momentum * buf + (1 - dampening) * g;
    g = g + momentum * buf (nesterov) or buf; then p -= lr * g.

    model_or_param_groups: a model (all its trainable parameters in one group), param_groups(model, ...),
    or (model, [{"params": [names], "lr": ...}, ...]); a group's own values override the defaults.
    """

    def __init__(self, model_or_param_groups, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, dampening: float = 0.0):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening (as in torch)")
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be non-negative, got {lr}, {momentum}, {weight_decay}")
        model, groups = _model_and_groups(model_or_param_groups)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, dampening=dampening)
        super().__init__(model, groups, defaults)

    def _update(self, param, grad, state, group):
        weight_decay, momentum, dampening = group["weight_decay"], group["momentum"], group["dampening"]
        # The same operations as torch, in its order; the temporaries go to one work array shaped like
        # `param` (a fresh array per operation costs a step as much as the arithmetic: page faults).
        work = self._work_array(param)
        if weight_decay:
            np.multiply(param, weight_decay, out=work)
            work += grad  # grad + weight_decay * param
            grad = work
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.copy()
            else:
                buf *= momentum
                buf += grad if dampening == 0 else (1 - dampening) * grad
            grad = grad + momentum * buf if group["nesterov"] else buf
        np.multiply(grad, group["lr"], out=work)
        param -= work


class AdamW(Optimizer):
    """torch.optim.AdamW: p *= 1 - lr * weight_decay (decoupled decay, first); then
    m = beta1 m + (1 - beta1) g, v = beta2 v + (1 - beta2) g^2,
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)."""

    def __init__(self, model_or_param_groups, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyperparameters lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        model, groups = _model_and_groups(model_or_param_groups)
        defaults = dict(lr=lr, betas=[float(betas[0]), float(betas[1])], eps=eps, weight_decay=weight_decay)
        super().__init__(model, groups, defaults)

    def _update(self, param, grad, state, group):
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(param)
            state["exp_avg_sq"] = np.zeros_like(param)
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        param *= 1 - lr * group["weight_decay"]
        exp_avg += (grad - exp_avg) * (1 - beta1)  # torch's lerp
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * grad * grad
        step_size = lr / (1 - beta1**step)
        denom = np.sqrt(exp_avg_sq) / math.sqrt(1 - beta2**step)
        denom += eps
        param -= step_size * (exp_avg / denom)


def _model_and_groups(model_or_param_groups):
    """A model alone, a ParamGroups, or (model, list of groups)."""
    if isinstance(model_or_param_groups, ResNet):
        return model_or_param_groups, None
    if isinstance(model_or_param_groups, ParamGroups):
        return model_or_param_groups.model, list(model_or_param_groups)
    if isinstance(model_or_param_groups, tuple) and len(model_or_param_groups) == 2:
        model, groups = model_or_param_groups
        return model, list(groups)
    raise TypeError("pass a model, npresnet.param_groups(model, ...), or (model, list of parameter groups)")


# --- learning-rate schedules ---------------------------------------------------------------


class LRScheduler:
    """torch.optim.lr_scheduler.LRScheduler: on creation each group's lr becomes its initial value
    for step 0; each step() computes the next lrs from the current ones (get_lr)."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = -1
        self._initial_step()

    def _initial_step(self) -> None:
        self._step_count = 0
        self._is_initial = True
        self.step()
        self._is_initial = False

    def step(self) -> None:
        self._step_count += 1
        self._update_lr()

    def _update_lr(self, epoch: int | None = None) -> None:
        if epoch is None:
            self.last_epoch += 1
            values = self.get_lr()
        else:
            self.last_epoch = epoch
            values = self._closed_form_lr()
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        raise NotImplementedError

    def _closed_form_lr(self) -> list[float]:
        raise NotImplementedError

    def get_last_lr(self) -> list[float]:
        """The learning rate of each group, as the last step() set it."""
        return list(self._last_lr)

    def _lrs(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer: numbers and lists, JSON-able."""
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.__dict__.update(copy.deepcopy(dict(state_dict)))


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2, in torch's recursive form."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0):
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer)

    def get_lr(self):
        t, T = self.last_epoch, self.T_max
        if self._is_initial:
            return self._lrs()
        if self._step_count == 1 and t > 0:
            return [self.eta_min + (b - self.eta_min) * (1 + math.cos(t * math.pi / T)) / 2 for b in self.base_lrs]
        if (t - 1 - T) % (2 * T) == 0:
            return [lr + (b - self.eta_min) * (1 - math.cos(math.pi / T)) / 2 for lr, b in zip(self._lrs(), self.base_lrs)]
        return [
            (1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T)) * (lr - self.eta_min) + self.eta_min
            for lr in self._lrs()
        ]

    def _closed_form_lr(self):
        t, T = self.last_epoch, self.T_max
        return [self.eta_min + (b - self.eta_min) * (1 + math.cos(math.pi * t / T)) / 2 for b in self.base_lrs]


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (t // step_size)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._lrs()
        return [lr * self.gamma for lr in self._lrs()]

    def _closed_form_lr(self):
        return [b * self.gamma ** (self.last_epoch // self.step_size) for b in self.base_lrs]


class LinearLR(LRScheduler):
    """lr = base_lr * factor, the factor going linearly from start_factor to end_factor over total_iters steps."""

    def __init__(self, optimizer: Optimizer, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5):
        if not 0 < start_factor <= 1 or not 0 <= end_factor <= 1:
            raise ValueError(f"start_factor must be in (0, 1] and end_factor in [0, 1], got {start_factor}, {end_factor}")
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer)

    def get_lr(self):
        t = self.last_epoch
        if t == 0:
            return [lr * self.start_factor for lr in self._lrs()]
        if self._is_initial or t > self.total_iters:
            return self._lrs()
        ratio = 1.0 + (self.end_factor - self.start_factor) / (
            self.total_iters * self.start_factor + (t - 1) * (self.end_factor - self.start_factor)
        )
        return [lr * ratio for lr in self._lrs()]

    def _closed_form_lr(self):
        t = min(self.total_iters, self.last_epoch)
        factor = self.start_factor + (self.end_factor - self.start_factor) * t / self.total_iters
        return [b * factor for b in self.base_lrs]


class LinearWarmup(LinearLR):
    """Linear warm-up from start_factor * lr to lr over warmup_steps steps (torch's LinearLR)."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, start_factor: float = 1.0 / 3):
        super().__init__(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)


class SequentialLR:
    """torch.optim.lr_scheduler.SequentialLR: schedulers[i] runs from milestones[i - 1] on
    (e.g. LinearWarmup for 5 steps, then CosineAnnealingLR)."""

    def __init__(self, optimizer: Optimizer, schedulers: list[LRScheduler], milestones: list[int]):
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"{len(schedulers)} schedulers need {len(schedulers) - 1} milestones, got {len(milestones)}")
        if any(s.optimizer is not optimizer for s in schedulers):
            raise ValueError("every scheduler must belong to the same optimizer")
        self.optimizer = optimizer
        self._schedulers = schedulers
        self._milestones = list(milestones)
        self.last_epoch = 0
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        for s in schedulers:  # undo the step each scheduler took when it was made
            s.last_epoch -= 1
        schedulers[0]._initial_step()
        self._last_lr = schedulers[0].get_last_lr()

    def step(self) -> None:
        self.last_epoch += 1
        index = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[index]
        if index > 0 and self._milestones[index - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_epoch": self.last_epoch,
            "_milestones": list(self._milestones),
            "_last_lr": list(self._last_lr),
            "_schedulers": [s.state_dict() for s in self._schedulers],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.last_epoch = state_dict["last_epoch"]
        self._milestones = list(state_dict["_milestones"])
        self._last_lr = list(state_dict["_last_lr"])
        for s, sd in zip(self._schedulers, state_dict["_schedulers"]):
            s.load_state_dict(sd)


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, start_factor: float = 1.0 / 3,
                  eta_min: float = 0.0):
    """Linear warm-up for warmup_steps, then cosine annealing to eta_min at total_steps
    (SequentialLR of LinearWarmup and CosineAnnealingLR(T_max=total_steps - warmup_steps));
    plain cosine when warmup_steps is 0."""
    if warmup_steps <= 0:
        return CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=eta_min)
    warmup = LinearWarmup(optimizer, warmup_steps, start_factor=start_factor)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=eta_min)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
