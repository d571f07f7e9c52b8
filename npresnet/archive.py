"""Bounded reading of untrusted weights files: the allocation budget, and zip members read by their real size.

A hostile file can claim anything: a member that inflates to gigabytes, a tensor that views one
storage a thousand times, a header declaring a huge shape. Every reader therefore charges what it
allocates because of the file to one ``LoadBudget`` and checks each claim before allocating.

The budget of a file of ``size`` bytes is ``4 * size + 64 MiB``: a legitimate file holds at most
about twice its size once read (bfloat16 and float16 tensors widen to float32), and a reader may
hold the raw bytes and the arrays at once. ``$NPRESNET_MAX_LOAD_BYTES`` (bytes) or the
``max_bytes`` argument of the readers replaces it, for the rare legitimate file that needs more
(a highly compressed .npz, a checkpoint of many overlapping views).

Zip members (PyTorch's zip checkpoints and .npz files) are read only when stored or deflated and
not encrypted, in chunks, counting the bytes as they inflate: the sizes a zip declares are never
trusted for allocation.

References: APPNOTE.TXT (PKWARE's zip specification), sections 4.4.4 (general purpose flags)
and 4.4.5 (compression methods); Python's ``zipfile`` module.
"""
from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path

from .errors import WeightsError

MAX_LOAD_BYTES_ENV = "NPRESNET_MAX_LOAD_BYTES"
BUDGET_FACTOR = 4
BUDGET_SLACK = 64 << 20
CHUNK = 1 << 20
MAX_ZIP_MEMBERS = 100_000  # a ResNet checkpoint has a few hundred; each parsed entry costs ~400 bytes of memory
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}


def default_max_bytes(file_size: int) -> int:
    """The allocation cap for a file of `file_size` bytes: $NPRESNET_MAX_LOAD_BYTES, else 4 x size + 64 MiB."""
    env = os.environ.get(MAX_LOAD_BYTES_ENV)
    if env:
        try:
            value = int(env)
        except ValueError:
            value = -1
        if value < 0:
            raise WeightsError(f"{MAX_LOAD_BYTES_ENV} must be a non-negative number of bytes, not {env!r}")
        return value
    return BUDGET_FACTOR * file_size + BUDGET_SLACK


class LoadBudget:
    """The bytes one load may still allocate; `charge` raises WeightsError (naming the file) past the cap."""

    def __init__(self, source: str, file_size: int, max_bytes: int | None = None):
        self.source = source
        self.limit = default_max_bytes(file_size) if max_bytes is None else max_bytes
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        self.used += nbytes
        if self.used > self.limit:
            raise WeightsError(
                f"{self.source}: {what} would take the bytes allocated for this file past its cap of "
                f"{self.limit} bytes (4 x the file size + 64 MiB); a hostile or corrupt file? "
                f"If the file is trusted, raise the cap with ${MAX_LOAD_BYTES_ENV} or max_bytes="
            )


def open_zip(path: Path, source: str) -> zipfile.ZipFile:
    """A zip archive whose directory is sane (member count, names); WeightsError otherwise."""
    _check_member_count(path, source)
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, UnicodeDecodeError,
            NotImplementedError, OverflowError, zlib.error) as exc:
        raise WeightsError(f"{source}: not a readable zip archive ({_cause(exc)}); truncated download?") from None


def _check_member_count(path: Path, source: str) -> None:
    """Refuse a zip directory of more than MAX_ZIP_MEMBERS entries before zipfile parses (and stores) them all."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - (1 << 16) - 22))
        tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return  # zipfile will say what is wrong
    (count,) = struct.unpack("<H", tail[at + 10 : at + 12])
    locator = tail.rfind(b"PK\x06\x06", 0, at)  # zip64 end of central directory record
    if locator >= 0 and locator + 40 <= len(tail):
        (count,) = struct.unpack("<Q", tail[locator + 32 : locator + 40])
    if count > MAX_ZIP_MEMBERS:
        raise WeightsError(f"{source}: a zip archive of {count} members; more than {MAX_ZIP_MEMBERS} is refused")


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: LoadBudget, source: str) -> bytes | bytearray:
    """The bytes of one member, counted against `budget` as they inflate; WeightsError for anything unsafe or unreadable."""
    name = info.filename
    if info.flag_bits & 0x1:
        raise WeightsError(f"{source}: member {name} is encrypted")
    if info.compress_type not in ZIP_METHODS:
        raise WeightsError(
            f"{source}: member {name} uses compression method {info.compress_type}; only stored and deflated are read"
        )
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        # zipfile reads a stored member in one read of its compressed size: a lie there would size the buffer.
        raise WeightsError(f"{source}: member {name} is stored, yet its sizes differ ({info.compress_size} and {info.file_size})")
    if info.file_size > budget.limit - budget.used:  # a claim can only make us refuse early, never allocate
        raise WeightsError(
            f"{source}: member {name} claims {info.file_size} bytes, more than the {budget.limit - budget.used} "
            f"bytes left of this file's cap ({budget.limit}; ${MAX_LOAD_BYTES_ENV} raises it)"
        )
    try:
        with archive.open(info) as member:
            if info.compress_type == zipfile.ZIP_STORED:
                # Stored bytes cannot inflate: at most the bytes physically in the file come back, in one read.
                data = member.read()
                budget.charge(len(data), f"member {name}")
                return data
            data = bytearray()
            while chunk := member.read(CHUNK):
                budget.charge(len(chunk), f"member {name}")
                data += chunk
    except WeightsError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError, NotImplementedError, ValueError,
            struct.error, OverflowError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{source}: member {name} is unreadable ({_cause(exc)})") from None
    return data


def _cause(exc: BaseException) -> str:
    """An exception in words, cut short: library messages about hostile data can quote that data."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."
