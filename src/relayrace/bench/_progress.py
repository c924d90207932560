"""A plain text progress bar on stderr (one line redrawn on a terminal, sparse lines elsewhere)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Weighted progress: ``advance(weight, label)`` as each piece of work ends."""

    def __init__(self, total: float, *, stream: TextIO | None = None, width: int = 30):
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.started = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_percent = -100.0
        self.label = ""

    def start(self, label: str) -> None:
        """Say what runs now (without advancing)."""
        self.label = label
        self._draw(force=True)

    def advance(self, weight: float, label: str | None = None) -> None:
        self.done = min(self.total, self.done + weight)
        if label is not None:
            self.label = label
        self._draw()

    def close(self) -> None:
        self.done = self.total
        self.label = "done"
        self._draw(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        fraction = self.done / self.total
        percent = fraction * 100
        if not self.tty and not force and percent - self._last_percent < 10:
            return
        self._last_percent = percent
        filled = int(round(fraction * self.width))
        elapsed = time.perf_counter() - self.started
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {percent:5.1f}% "
            f"{elapsed:6.1f}s  {self.label}"
        )
        if self.tty:
            self.stream.write("\r\x1b[K" + line[:160])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
