"""Backends: the table of ops the model calls, and how one is chosen.

The model (``model.py``) never branches on the backend: it calls the methods of
``Backend`` below. A backend owns the layout of activations between
``from_numpy`` and ``to_numpy`` (NCHW here; a compiled backend may use NHWC,
a blocked layout or device memory), and turns each folded convolution into
whatever it runs fastest (``prepare_conv``), once per model and dtype.

``NumpyBackend`` is the readable reference built from ``functional.py``.
The optional compiled backends live in the ``npresnet_kernels`` package (the
repository's ``kernels/`` folder); each module there registers its backend
with ``register_backend`` when, and only when, its compiler imports.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import functional as F
from .errors import BackendUnavailable  # noqa: F401  (defined in errors.py; imported from here by kernels and users)


@dataclass(frozen=True)
class FoldedConv:
    """A convolution with its batch norm folded in: y = conv2d(x, weight) + bias.

    weight: (K, C/G, R, S); bias: (K,); both in the dtype the model runs in.
    """

    weight: np.ndarray
    bias: np.ndarray
    stride: int
    padding: int
    groups: int


class Backend:
    """The ops a ResNet forward pass needs. Activations are opaque between from_numpy and to_numpy."""

    name = "abstract"
    # Whether several threads may run forward passes on one model at once. False unless a backend has
    # been checked: `npresnet serve` serialises the forward passes of a backend that is not.
    thread_safe = False

    def prepare_conv(self, conv: FoldedConv) -> Any:
        """Turn a folded convolution into this backend's form (re-layout, transform, upload)."""
        raise NotImplementedError

    def prepare_linear(self, weight: np.ndarray, bias: np.ndarray) -> Any:
        """weight (K, C), bias (K,) -> this backend's form."""
        raise NotImplementedError

    def from_numpy(self, x: np.ndarray) -> Any:
        """(N, C, H, W) array -> activation."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        """Activation -> (N, C, H, W), or (N, C) after pooling, as a NumPy array the caller owns."""
        raise NotImplementedError

    def conv(self, x: Any, conv: Any, relu: bool, residual: Any = None) -> Any:
        """functional.conv2d_bias_act: max(conv(x) + bias + residual, 0) if relu, else without the max (residual optional)."""
        raise NotImplementedError

    def max_pool(self, x: Any) -> Any:
        """3x3, stride 2, padding 1 max pool (the ImageNet stem's)."""
        raise NotImplementedError

    def global_avg_pool(self, x: Any) -> Any:
        """(N, C, H, W) -> (N, C): the mean over all positions."""
        raise NotImplementedError

    def linear(self, x: Any, fc: Any) -> Any:
        """(N, C) -> (N, K)."""
        raise NotImplementedError


class NumpyBackend(Backend):
    """The reference ops of ``functional.py``, NCHW, batch norm folded at load."""

    name = "numpy"
    # Pure functions of their arguments (prepared weights are only read), and NumPy's BLAS is thread-safe.
    thread_safe = True

    def __init__(self, threads: int | None = None):
        # NumPy's BLAS picks its own thread count from the environment
        # (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS) when it is loaded.
        self.threads = threads

    def prepare_conv(self, conv: FoldedConv) -> FoldedConv:
        return conv

    def prepare_linear(self, weight, bias):
        return weight, bias

    def from_numpy(self, x):
        return x

    def to_numpy(self, x):
        return x

    def conv(self, x, conv: FoldedConv, relu, residual=None):
        return F.conv2d_bias_act(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.groups, residual, relu)

    def max_pool(self, x):
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)

    def global_avg_pool(self, x):
        return F.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], x.shape[1])

    def linear(self, x, fc):
        weight, bias = fc
        return F.linear(x, weight, bias)


# name -> factory(threads) -> Backend
_REGISTRY: dict[str, Callable[..., Backend]] = {"numpy": NumpyBackend}
# Optional backends: name -> (module that registers it on import, the extra that installs its compiler).
_OPTIONAL = {
    "numba": ("npresnet_kernels.cpu", "numba"),
    "cuda": ("npresnet_kernels.cuda", "cuda"),
}
# What "auto" tries, fastest first. CUDA is not tried: it is only used when asked for.
AUTO_ORDER = ("numba", "numpy")


def register_backend(name: str, factory: Callable[..., Backend]) -> None:
    """Make `name` available to get_backend; `factory(threads=...)` builds one."""
    _REGISTRY[name] = factory


def default_threads(threads: int | None = None) -> int | None:
    """The thread count asked for: the argument, else $NPRESNET_NUM_THREADS, else None (the library's default)."""
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        return int(threads)
    env = os.environ.get("NPRESNET_NUM_THREADS")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"NPRESNET_NUM_THREADS must be a positive integer, not {env!r}") from None
        if value < 1:
            raise ValueError(f"NPRESNET_NUM_THREADS must be a positive integer, not {env!r}")
        return value
    return None


def _load_optional(name: str) -> None:
    module, extra = _OPTIONAL[name]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(
            f"backend {name!r} is not available: {exc}. Install it with: pip install 'npresnet[{extra}]'"
        ) from exc
    if name not in _REGISTRY:
        raise BackendUnavailable(f"backend {name!r} is not available on this machine")


def get_backend(name: str | Backend = "auto", threads: int | None = None) -> Backend:
    """A backend by name: "numpy", "numba", "cuda", or "auto" (the fastest that works here)."""
    if isinstance(name, Backend):
        return name
    threads = default_threads(threads)
    if name == "auto":
        for candidate in AUTO_ORDER:
            try:
                return get_backend(candidate, threads)
            except BackendUnavailable:
                continue
        return NumpyBackend(threads)
    if name not in _REGISTRY:
        if name not in _OPTIONAL:
            known = ", ".join(["auto", *_REGISTRY, *(n for n in _OPTIONAL if n not in _REGISTRY)])
            raise ValueError(f"unknown backend {name!r}; known: {known}")
        _load_optional(name)
    return _REGISTRY[name](threads=threads)


def available_backends() -> list[str]:
    """The backends that can run on this machine."""
    names = []
    for name in ["numpy", *_OPTIONAL]:
        try:
            get_backend(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names
