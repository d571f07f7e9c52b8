"""The exceptions npresnet raises, in one leaf module that imports nothing of npresnet.

Each failure has one type, so that a caller catches what the API promises:

* ``WeightsError``: a weights file (.npz, .pth, .safetensors) or a state dict that cannot be
  read or does not fit; the message names the file (or "state dict") and the cause.
* ``FetchError``: a download of official weights that failed or did not verify.
* ``ImageError``: an image that cannot be read or preprocessed; the message starts with its name.
* ``DataError``: a data folder, class map or setting of a job (training, evaluation) that is
  unusable as given; the message names the folder, file or setting.
* ``BackendUnavailable``: the backend asked for cannot run here (compiler or device missing).

``WeightsError``, ``ImageError`` and ``DataError`` are ``ValueError``s (bad input), ``BackendUnavailable``
a ``RuntimeError`` (the machine, not the input).
"""
from __future__ import annotations


class WeightsError(ValueError):
    """A weights file or state dict that cannot be read or does not fit; the message names the file and every problem found."""


class FetchError(WeightsError):
    """A download that failed or did not verify; nothing was written to the cache."""


class ImageError(ValueError):
    """An image that cannot be read or preprocessed; the message starts with the image's name."""


class DataError(ValueError):
    """A data folder, class map or job setting that is unusable as given; the message names it."""


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here (its compiler or device is missing)."""
