"""npresnet's optional compiled kernels, installed as ``npresnet_kernels``.

``cpu.py``: Numba CPU kernels (backend "numba"); ``cuda.py``: numba.cuda kernels
(backend "cuda"). Each registers its backend with ``npresnet.backends`` on import,
and fails to import (ImportError) where its compiler is missing. ``train.py``: the
numba backend's training ops, registered with ``npresnet.autograd`` the same way.
"""
