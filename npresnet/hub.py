"""Fetching TorchVision's official weights: download, verify, convert, cache.

``fetch("resnet50", "IMAGENET1K_V2")`` returns the path of a cached .npz,
downloading ``resnet50-11ad3fa6.pth`` first if needed. TorchVision names each
file ``<arch>-<first 8 hex digits of its sha256>.pth``; the download is
hashed as it streams and must begin with that prefix, so a corrupt or
tampered file is refused, and a file whose name carries no prefix is refused
too unless the caller supplies the expected sha256. The download goes to a
temporary file beside the cache and only the converted .npz is renamed into
place: an interrupted or corrupt transfer never lands in the cache.

The cache is ``$NPRESNET_HOME`` (default ``~/.cache/npresnet``); the base URL
of the files is ``$NPRESNET_BASE_URL`` (default TorchVision's), so that a
mirror, or a test's local server, can stand in.

Reference: ``torch.hub.download_url_to_file`` and ``load_state_dict_from_url``
(temp file, then rename; ``check_hash`` against the file-name prefix).
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .manifest import DEFAULT, WeightsEntry, get_weights_entry, sha256_prefix
from .errors import FetchError
from .formats import convert

DEFAULT_HOME = "~/.cache/npresnet"
CHUNK = 1 << 16
TIMEOUT_S = 30


def is_weights_name(weights) -> bool:
    """Whether `weights` names official weights ("DEFAULT", "IMAGENET1K_V2") rather than a file path."""
    return (
        isinstance(weights, str)
        and weights.replace("_", "").isalnum()
        and weights.upper() == weights
        and not os.path.exists(weights)
    )


def cache_dir() -> Path:
    return Path(os.environ.get("NPRESNET_HOME") or DEFAULT_HOME).expanduser()


def weights_url(entry: WeightsEntry, base_url: str | None = None) -> str:
    base = base_url or os.environ.get("NPRESNET_BASE_URL")
    return f"{base.rstrip('/')}/{entry.file_name}" if base else entry.url


def fetch(
    arch: str,
    name: str = DEFAULT,
    *,
    base_url: str | None = None,
    progress: bool | None = None,
) -> Path:
    """The cached .npz of `arch`'s official weights `name`, downloaded, verified and converted if absent.

    progress: a bar on stderr; None shows it only when stderr is a terminal.
    """
    entry = get_weights_entry(arch, name)
    target = cache_dir() / (Path(entry.file_name).stem + ".npz")
    if target.is_file():
        return target
    url = weights_url(entry, base_url)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Hidden temporary files beside the cache (the .pth suffix is what the reader dispatches on);
    # only a verified, converted file of the right architecture is renamed into place.
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.file_name}.", suffix=".pth", dir=target.parent)
    os.close(fd)
    tmp_npz = tmp + ".npz"
    try:
        download(url, tmp, progress=progress)
        facts = {"source": entry.file_name, "weights": f"{entry.arch}.{entry.name}", **entry.preprocessing}
        meta = convert(tmp, tmp_npz, meta=facts)
        if meta["arch"] != entry.arch:
            raise FetchError(f"{url}: holds weights for {meta['arch']}, not {entry.arch}")
        os.replace(tmp_npz, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
        Path(tmp_npz).unlink(missing_ok=True)
    return target


def download(url: str, dst: str | os.PathLike, *, sha256: str | None = None, progress: bool | None = None) -> str:
    """Stream `url` into `dst`, verifying its sha256; return the full hex digest.

    The expected hash is `sha256` (a full digest or a prefix) or else the
    prefix in the URL's file name (<name>-<hex>.<ext>); with neither, the
    download is refused rather than accepted unverified. On any failure `dst`
    is removed. Raises FetchError.
    """
    file_name = url.rsplit("/", 1)[-1]
    expected = (sha256 or sha256_prefix(file_name) or "").lower()
    if not expected:
        raise FetchError(
            f"{url}: cannot verify: the file name carries no sha256 prefix (<name>-<hex>.pth) and no sha256 was given"
        )
    dst = Path(dst)
    digest = hashlib.sha256()
    try:
        try:
            response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError(
                f"could not download {url} ({reason}). Without network: download {file_name} elsewhere, "
                f"then run `npresnet convert {file_name} {Path(file_name).stem}.npz` and pass that .npz as weights=..."
            ) from None
        with response, open(dst, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = ProgressBar(file_name, total) if _show_progress(progress) else None
            received = 0
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    if bar:
                        bar.update(received)
            except (OSError, ValueError) as exc:
                raise FetchError(f"{url}: transfer failed after {received} bytes ({exc})") from None
            finally:
                if bar:
                    bar.close()
        # http.client returns a short body without error when the server closes early: check the length.
        if total is not None and received != total:
            raise FetchError(f"{url}: truncated transfer: received {received} of {total} bytes")
        actual = digest.hexdigest()
        if not actual.startswith(expected):
            raise FetchError(f"{url}: sha256 mismatch: expected {expected}..., got {actual}")
        return actual
    except BaseException as exc:
        dst.unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, FetchError):
            raise FetchError(f"{url}: download failed ({type(exc).__name__}: {exc})") from exc
        raise


def _show_progress(progress: bool | None) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    return progress


class ProgressBar:
    """A one-line bar on stderr (a terminal only: see _show_progress)."""

    WIDTH = 30

    def __init__(self, label: str, total: int | None):
        self.label, self.total = label, total

    def update(self, received: int) -> None:
        mib = received / 2**20
        if self.total:
            done = min(received / self.total, 1.0)
            bar = "#" * int(done * self.WIDTH)
            line = f"{self.label} [{bar:<{self.WIDTH}}] {done:4.0%} {mib:.1f} MiB"
        else:
            line = f"{self.label} {mib:.1f} MiB"
        sys.stderr.write("\r" + line)
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()
