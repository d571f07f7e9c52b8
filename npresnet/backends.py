"""Backends: the table of ops the model calls, and how one is chosen.

The model (``model.py``) never branches on the backend: it calls the methods of
``Backend`` below. A backend owns the layout of activations between
``from_numpy`` and ``to_numpy`` (NCHW here; a compiled backend may use NHWC,
a blocked layout or device memory), and turns each convolution and its batch
norm into whatever it runs fastest (``prepare_conv_bn``: by default the batch norm
folded into the weights, then ``prepare_conv``), once per model and dtype.

``NumpyBackend`` is the readable reference built from ``functional.py``.
The optional compiled backends live in the ``npresnet_kernels`` package (the
repository's ``kernels/`` folder); each module there registers its backend
with ``register_backend`` when, and only when, its compiler imports.

``backend="auto"`` is one rule (``choose_backend``), used by the Python API and the
command line alike: the backend expected to finish the whole job first, start-up
and kernel compilation included, from the measured costs in ``AUTO_COSTS``
(where each figure comes from: bench/results/notes.md).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import functional as F
from .errors import BackendUnavailable  # noqa: F401  (defined in errors.py; imported from here by kernels and users)
from .specs import count_macs


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


@dataclass(frozen=True)
class ConvBatchNorm:
    """A convolution and the inference-mode batch norm after it, not yet folded:
    y = conv2d(x, weight) * scale + bias, with scale and bias (K,) the batch norm's, in float64.

    weight: (K, C/G, R, S), the model's own array (in the dtype it holds); dtype: the one the model runs in.
    """

    weight: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    stride: int
    padding: int
    groups: int
    dtype: np.dtype

    def folded(self) -> FoldedConv:
        """The scale folded into the weights, in float64, rounded once to dtype."""
        weight = self.weight.astype(np.float64) * self.scale.reshape(-1, 1, 1, 1)
        return FoldedConv(weight.astype(self.dtype), self.bias.astype(self.dtype), self.stride, self.padding, self.groups)


class Backend:
    """The ops a ResNet forward pass needs. Activations are opaque between from_numpy and to_numpy."""

    name = "abstract"
    # Whether several threads may run forward passes on one model at once. False unless a backend has
    # been checked: `npresnet serve` serialises the forward passes of a backend that is not.
    thread_safe = False

    def running(self) -> contextlib.AbstractContextManager:
        """The context each forward pass runs in (the model enters it): none here; the Numba backend
        keeps the calling thread on its own CPU there, apart from its helper threads."""
        return contextlib.nullcontext()

    def prepare_conv(self, conv: FoldedConv) -> Any:
        """Turn a folded convolution into this backend's form (re-layout, transform, upload)."""
        raise NotImplementedError

    def prepare_conv_bn(self, conv: ConvBatchNorm) -> Any:
        """Prepare a convolution and its batch norm; by default folded (prepare_conv of conv.folded())."""
        return self.prepare_conv(conv.folded())

    # Whether the forms prepare_conv_bn and prepare_linear make keep the weights they were given, unfolded
    # (conv_weight and linear_weight give them back), so that a model running in its weights' own dtype
    # need not keep a copy of its own beside them.
    keeps_weights = False

    def conv_weight(self, prepared: Any) -> np.ndarray:
        """The weights (K, C/G, R, S) prepare_conv_bn was given, in its dtype: bit for bit where they
        were in that dtype (only where keeps_weights)."""
        raise NotImplementedError

    def prepare_linear(self, weight: np.ndarray, bias: np.ndarray) -> Any:
        """weight (K, C), bias (K,) -> this backend's form."""
        raise NotImplementedError

    def linear_weight(self, prepared: Any) -> np.ndarray:
        """The weight (K, C) prepare_linear was given, bit for bit (only where keeps_weights)."""
        raise NotImplementedError

    def from_numpy(self, x: np.ndarray) -> Any:
        """(N, C, H, W) array -> activation."""
        raise NotImplementedError

    def run_network(self, network: Callable, net: Any, h: Any) -> Any:
        """network(self, net, h): a forward pass of these ops on activation h (a backend may run it another
        way with the same result: the Numba backend replays a recorded plan)."""
        return network(self, net, h)

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


@dataclass(frozen=True)
class BackendCosts:
    """What a backend costs on a job, relative to the NumPy backend (the figures: bench/results/notes.md).

    startup_s: seconds a fresh process spends on it beyond NumPy's (import, loading cached kernels);
    compile_s: seconds more when its kernel cache is empty (compiling the kernels once);
    per_image: block ("basic", "bottleneck") -> its time per image over NumPy's at batch 1 and at
    batch 8 and above (between: linear).
    """

    startup_s: float
    compile_s: float
    per_image: dict[str, tuple[float, float]]

    def per_image_ratio(self, block: str | None, batch_size: int) -> float:
        """Time per image over NumPy's; block None (architecture unknown): the worst block's."""
        share = min(max(batch_size - 1, 0), 7) / 7
        ratios = [batch1 + share * (batched - batch1) for b, (batch1, batched) in self.per_image.items() if block in (None, b)]
        return max(ratios) if ratios else 1.0


# NumPy backend seconds per image per 1e9 multiply-adds (specs.count_macs), at 2 threads.
NUMPY_SECONDS_PER_GMAC = 0.014
# The backends "auto" chooses between. CUDA is not among them: it is only used when asked for.
AUTO_COSTS = {
    "numpy": BackendCosts(startup_s=0.0, compile_s=0.0, per_image={}),
    "numba": BackendCosts(
        startup_s=0.1, compile_s=4.6, per_image={"basic": (0.32, 0.25), "bottleneck": (0.35, 0.31)}
    ),
}


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


def kernel_cache_dir() -> str:
    """Where the compiled kernels are cached: $NUMBA_CACHE_DIR when the user set it, else
    $NPRESNET_HOME/numba, else $XDG_CACHE_HOME/npresnet/numba (~/.cache/npresnet/numba)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    home = os.environ.get("NPRESNET_HOME")
    if home:
        return os.path.join(home, "numba")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "npresnet", "numba")


BUILD_MODES = ("background", "wait")


def build_mode() -> str:
    """$NPRESNET_KERNEL_BUILD: "background" (the default: a compiled backend's kernels not yet in the cache
    are built by another process while NumPy runs their layers) or "wait" (built first)."""
    mode = os.environ.get("NPRESNET_KERNEL_BUILD") or "background"
    if mode not in BUILD_MODES:
        raise ValueError(f"NPRESNET_KERNEL_BUILD must be one of {', '.join(BUILD_MODES)}, not {mode!r}")
    return mode


# backend -> the module of its ahead-of-time-built kernels (npresnet_kernels.aot)
_KERNEL_MODULES = {"numba": "npresnet_kernels.cpu_kernels"}


def kernels_cached(name: str) -> bool:
    """Whether every kernel of backend `name` is built in the kernel cache from its current source
    (``npresnet_kernels.aot.built_kernels``: file names only, neither numba nor llvmlite imported).
    False for a backend without such kernels, or where they cannot be found."""
    if name not in _KERNEL_MODULES:
        return False
    try:
        from npresnet_kernels import aot

        kernels = aot.declared_kernels(_KERNEL_MODULES[name])
        return bool(kernels) and kernels <= aot.built_kernels(_KERNEL_MODULES[name])
    except (ImportError, OSError):
        return False


def choose_backend(
    spec: Any = None,
    num_images: int | None = None,
    batch_size: int = 1,
    size: tuple[int, int] = (224, 224),
    *,
    costs: dict[str, BackendCosts] | None = None,
    cached: dict[str, bool] | None = None,
    available: list[str] | None = None,
    build: str | None = None,
) -> str:
    """The rule behind backend="auto": of the backends that can run here, the one expected to finish
    the whole job first: start-up + time per image, and where its kernel cache is empty, the compile:
    in build mode "wait" its seconds come first; in "background" (a user's default,
    $NPRESNET_KERNEL_BUILD) the images run at NumPy's speed for those seconds, then at its own.

    spec: the architecture (a ResNetSpec: its multiply-adds at `size` and its block), None if not known
    (1e9 multiply-adds, the worst block's costs); num_images: the job's images, None for a job too long
    for start-up to count (a model kept for many calls: what the Python API assumes); batch_size: images
    per forward pass. costs (default AUTO_COSTS), cached (default: kernels_cached), available
    (default: those whose compiler is installed) and build (default: build_mode()) are for
    tests and what-ifs.
    """
    costs = AUTO_COSTS if costs is None else costs
    build = build or build_mode()
    macs = count_macs(spec, *size) if spec is not None else 1e9
    numpy_per_image_s = NUMPY_SECONDS_PER_GMAC * macs / 1e9
    block = spec.block if spec is not None else None
    best, best_s = "numpy", float("inf")
    for name, cost in costs.items():
        if available is not None and name not in available:
            continue
        if available is None and name != "numpy" and not _importable(name):
            continue
        per_image_s = cost.per_image_ratio(block, batch_size) * NUMPY_SECONDS_PER_GMAC * macs / 1e9
        if num_images is None:
            total_s = per_image_s
        else:
            warm = cached[name] if cached is not None and name in cached else kernels_cached(name)
            if warm or not cost.compile_s:
                total_s = cost.startup_s + num_images * per_image_s
            elif build == "wait":
                total_s = cost.startup_s + cost.compile_s + num_images * per_image_s
            else:  # the images the compile's seconds see run on NumPy, the rest on the kernels
                on_numpy = min(num_images, cost.compile_s / numpy_per_image_s)
                total_s = cost.startup_s + on_numpy * numpy_per_image_s + (num_images - on_numpy) * per_image_s
        if total_s < best_s:
            best, best_s = name, total_s
    return best


def _importable(name: str) -> bool:
    """Whether backend `name` can be tried: registered, or its compiler (numba) is installed. Found,
    not imported: importing numba takes a while."""
    if name in _REGISTRY:
        return True
    try:
        return name in _OPTIONAL and importlib.util.find_spec("numba") is not None
    except ImportError:
        return False


def get_backend(name: str | Backend = "auto", threads: int | None = None, spec: Any = None,
                num_images: int | None = None, batch_size: int = 1) -> Backend:
    """A backend by name: "numpy", "numba", "cuda", or "auto": choose_backend's pick for the job
    (the architecture `spec`, num_images, batch_size; without num_images, a long job at batch_size)."""
    if isinstance(name, Backend):
        return name
    threads = default_threads(threads)
    if name == "auto":
        try:
            return get_backend(choose_backend(spec, num_images, batch_size), threads)
        except BackendUnavailable:  # installed but not working here (numba without a usable LLVM, say)
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
