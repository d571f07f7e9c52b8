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
import tempfile
from pathlib import Path

from .errors import FetchError
from .formats import convert, file_sha256
from .manifest import DEFAULT, WeightsEntry, get_weights_entry, sha256_prefix, weights_names
from .progress import BYTES, Progress

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
    name: str | None = DEFAULT,
    *,
    base_url: str | None = None,
    progress: bool | None = None,
    from_file: str | os.PathLike | None = None,
) -> Path:
    """The cached .npz of `arch`'s official weights `name`, downloaded, verified and converted if absent.

    from_file: the official .pth, downloaded by hand (offline machines): it is verified by its sha256
    instead of downloaded, and cached as a download would be, so that weights=NAME then works offline.
    With from_file, name=None means whichever of `arch`'s official files it is.
    progress: a bar on stderr; None shows it only when stderr is a terminal.
    """
    if from_file is not None:
        return _cache_from_file(arch, name, from_file)
    entry = get_weights_entry(arch, name or DEFAULT)
    target = cached_path(entry)
    if target.is_file():
        return target
    url = weights_url(entry, base_url)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A hidden temporary file beside the cache (the .pth suffix is what the reader dispatches on).
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.file_name}.", suffix=".pth", dir=target.parent)
    os.close(fd)
    advice = (
        f"Offline: download {entry.file_name} on another machine, then run "
        f"`npresnet fetch {entry.arch} --from-file {entry.file_name}` (it checks the sha256 and caches it), "
        f"or pass the file itself: --weights {entry.file_name}"
    )
    try:
        download(url, tmp, progress=progress, offline_advice=advice)
        _convert_into_cache(entry, tmp, url)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def cached_path(entry: WeightsEntry) -> Path:
    """Where the converted .npz of an official file lives: $NPRESNET_HOME/<arch>-<hash>.npz."""
    return cache_dir() / (Path(entry.file_name).stem + ".npz")


def _convert_into_cache(entry: WeightsEntry, pth: str | os.PathLike, source: str) -> None:
    """Convert a verified official .pth and rename it into the cache; nothing lands there on failure."""
    target = cached_path(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_npz = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".npz", dir=target.parent)
    os.close(fd)
    try:
        facts = {"source": entry.file_name, "weights": f"{entry.arch}.{entry.name}", **entry.preprocessing}
        meta = convert(pth, tmp_npz, meta=facts)
        if meta["arch"] != entry.arch:
            raise FetchError(f"{source}: holds weights for {meta['arch']}, not {entry.arch}")
        os.replace(tmp_npz, target)
    finally:
        Path(tmp_npz).unlink(missing_ok=True)


def _cache_from_file(arch: str, name: str | None, path: str | os.PathLike) -> Path:
    try:
        sha256 = file_sha256(path)
    except FileNotFoundError:
        raise FetchError(f"{os.fspath(path)}: no such file") from None
    candidates = [get_weights_entry(arch, n) for n in ([name] if name else weights_names(arch))]
    matching = [e for e in candidates if e.sha256_prefix and sha256.startswith(e.sha256_prefix)]
    if not matching:
        if name:
            entry = candidates[0]
            raise FetchError(
                f"{os.fspath(path)}: sha256 mismatch: expected {entry.sha256_prefix}... ({entry.file_name}), "
                f"got {sha256}: a corrupt or incomplete download, or another file"
            )
        raise FetchError(
            f"{os.fspath(path)}: not one of TorchVision's {arch} files ({', '.join(e.file_name for e in candidates)}): "
            f"its sha256 is {sha256}, so it is a corrupt or incomplete download, or another file"
        )
    _convert_into_cache(matching[0], path, os.fspath(path))
    return cached_path(matching[0])


def download(
    url: str,
    dst: str | os.PathLike,
    *,
    sha256: str | None = None,
    progress: bool | None = None,
    offline_advice: str = "",
) -> str:
    """Stream `url` into `dst`, verifying its sha256; return the full hex digest.

    The expected hash is `sha256` (a full digest or a prefix) or else the
    prefix in the URL's file name (<name>-<hex>.<ext>); with neither, the
    download is refused rather than accepted unverified. On any failure `dst`
    is removed. Raises FetchError; where the network cannot be reached, its message ends with
    `offline_advice` (how to do without it).
    """
    file_name = url.rsplit("/", 1)[-1]
    expected = (sha256 or sha256_prefix(file_name) or "").lower()
    if not expected:
        raise FetchError(
            f"{url}: cannot verify: the file name carries no sha256 prefix (<name>-<hex>.pth) and no sha256 was given"
        )
    # Imported here, when something is downloaded: urllib.request brings ssl and http.client, some 7 MB
    # of every npresnet process's memory otherwise.
    import urllib.error
    import urllib.request

    dst = Path(dst)
    digest = hashlib.sha256()
    try:
        try:
            response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError(f"could not download {url} ({reason}){'. ' + offline_advice if offline_advice else ''}") from None
        with response, open(dst, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = Progress(total, BYTES, label=file_name, enabled=progress)
            received = 0
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(received)
            except (OSError, ValueError) as exc:
                raise FetchError(f"{url}: transfer failed after {received} bytes ({exc})") from None
            finally:
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
