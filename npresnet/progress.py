"""The one progress bar: a line on stderr, redrawn in place, for images classified and bytes downloaded.

    [###############...............] 2/4 images
    resnet50-11ad3fa6.pth [######........................] 20% 19.5 MiB

It is drawn only on a terminal (a pipe or a log file gets no carriage returns), and not for a single
item, where it would say nothing. The command line (``cli.py``) and downloads (``hub.py``) use it.
"""
from __future__ import annotations

import sys
from typing import TextIO

BYTES = "bytes"
MIB = 1 << 20


class Progress:
    """`total` items of `unit` ("images", or BYTES for a download, shown in MiB; total None if unknown)."""

    WIDTH = 30

    def __init__(
        self,
        total: int | None,
        unit: str = "images",
        *,
        label: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ):
        self.stream = stream or sys.stderr
        self.total, self.unit, self.label = total, unit, label
        self.done = 0
        self.status = ""
        self.drawn = False
        if enabled is None:
            enabled = total != 1 and self.stream.isatty()
        self.enabled = enabled

    def update(self, done: int, status: str = "") -> None:
        """Set the count done so far and redraw; `status` goes after the count (e.g. "  loss 0.41")."""
        self.done = done
        self.status = status
        if self.enabled:
            self.stream.write("\r" + self.line())
            self.stream.flush()
            self.drawn = True

    def advance(self, count: int = 1, status: str = "") -> None:
        self.update(self.done + count, status)

    def line(self) -> str:
        parts = [self.label] if self.label else []
        if self.total:
            filled = self.WIDTH * min(self.done, self.total) // self.total
            parts.append("[" + "#" * filled + "." * (self.WIDTH - filled) + "]")
        if self.unit == BYTES:
            if self.total:
                parts.append(f"{min(self.done / self.total, 1.0):4.0%}")
            parts.append(f"{self.done / MIB:.1f} MiB")
        else:
            parts.append(f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}")
        return " ".join(parts) + self.status

    def clear(self) -> None:
        """Erase the bar (the next update draws it again), so that other output starts on a clean line."""
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False

    def message(self, line: str) -> None:
        """Print a line to the bar's stream without mangling the bar."""
        self.clear()
        print(line, file=self.stream)

    close = clear
