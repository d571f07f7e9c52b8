"""Compile the Numba kernels the suite runs into the kernel cache, ahead of the tests that call them.

Started with the session by tests/conftest.py, in a process of its own on the core the suite leaves
idle: in a fresh checkout (CI) the kernels are compiled here while the main process runs the NumPy
tests, and the tests then load them from the cache. A kernel is compiled for the argument types of
its first call, so this runs each path the tests take once per dtype: a forward pass of a basic and
a grouped bottleneck network at 64x64 (Winograd F(4x4) and F(2x2), the direct path for the stem and
strided convolutions, GEMMs, im2col for the grouped ones: tests/test_model.py), and training steps
in train mode, with a frozen prefix, and with label smoothing (tests/test_grad.py). A test that
comes first compiles for itself, as without this: the cache is shared, nothing depends on the order.
"""
import numpy as np

import npresnet
from npresnet.specs import BASIC, BOTTLENECK, ResNetSpec

NETWORKS = (
    ResNetSpec("warm_basic", BASIC, (1, 1, 1, 1), planes=(16, 32, 64, 128), num_classes=10),
    ResNetSpec("warm_grouped", BOTTLENECK, (1, 1, 1, 1), groups=4, width_per_group=4, planes=(16, 32, 64, 128),
               num_classes=10),
)


def warm() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([1, 2])
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((2, 3, 64, 64)).astype(dtype)
        for spec in NETWORKS:
            model = npresnet.build(spec, backend="numba")
            model(x)
            model.train()
            npresnet.value_and_grad(model, x, labels, label_smoothing=0.1)
            model.freeze("layer1")
            npresnet.value_and_grad(model, x, labels)


if __name__ == "__main__":
    warm()
