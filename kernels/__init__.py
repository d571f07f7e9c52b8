"""npresnet's optional compiled kernels, installed as ``npresnet_kernels``.

``cpu.py``: the Numba CPU backend (backend "numba"), whose kernels are in ``cpu_kernels.py`` and are
built ahead of time by ``aot.py`` and whose helper threads are in ``threads.py``; ``cuda.py``: numba.cuda kernels (backend "cuda"). Each registers
its backend with ``npresnet.backends`` on import, and fails to import (ImportError) where its compiler
is missing. ``train.py``: the numba backend's training ops, registered with ``npresnet.autograd`` the
same way.
"""

import contextlib
import logging
import sys

# What a process says once on stderr (the "npresnet" logger, which a user can configure or silence), so
# that a first run's seconds of compiling never look like a hang; %s: the kernel cache.
COMPILING = "npresnet: compiling the Numba kernels for this machine (once; a few seconds; cached in %s)"
BUILDING_IN_BACKGROUND = (
    "npresnet: building the Numba kernels for this machine in the background (once; about 15 s of one "
    "core; cached in %s); until they are ready, their layers run on NumPy"
)
_announced: set[str] = set()


def announce(message: str, cache_dir: str) -> None:
    """Log `message` (COMPILING or BUILDING_IN_BACKGROUND) with the cache's path, the first time this process says it."""
    if message not in _announced:
        _announced.add(message)
        logging.getLogger("npresnet").warning(message, cache_dir)


# SciPy as numba would otherwise meet it: numba imports scipy only to check its version when it is
# imported (0.2 s), and scipy.linalg.cython_blas to look for a BLAS for its own np.dot when its CPU
# target starts (0.45 s). Our kernels call neither (their products are their own, or NumPy's), so
# these imports are hidden from numba: a fresh process with SciPy installed starts 0.6 s sooner.
_SCIPY_MODULES = ("scipy", "scipy.linalg.cython_blas")


@contextlib.contextmanager
def scipy_hidden_from_numba():
    """For the duration, importing SciPy (if not yet imported) fails, as if it were not installed; then
    it imports as usual. The only lasting effect: numba's np.correlate and np.convolve loop in place of
    calling BLAS (numba.np.arraymath._HAVE_BLAS, decided when that module is imported); its np.dot and
    np.linalg look for SciPy each time they compile, so they work once SciPy can be imported again."""
    hidden = [name for name in _SCIPY_MODULES if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # import raises ModuleNotFoundError
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
