"""A one-line progress report on stderr, without a dependency.

On a terminal the line is redrawn in place (`\\r`) a few times a second; in a log file (a Ray
job, CI) a plain line is printed every `log_every` seconds, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self, stream: TextIO | None = None, enabled: bool = True, log_every: float = 10.0
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._tty = enabled and self._stream.isatty()
        self._log_every = log_every
        self._task = ""
        self._unit = ""
        self._total = 0
        self._done = 0
        self._started = 0.0
        self._last_print = 0.0
        self._line_open = False

    def start(self, task: str, total: int, unit: str) -> None:
        self._task, self._total, self._unit = task, total, unit
        self._done = 0
        self._started = self._last_print = time.monotonic()
        self._show(force=self._tty)

    def advance(self, n: int = 1) -> None:
        self._done += n
        self._show(force=False)

    def finish(self) -> float:
        """End the current task with a final line; returns its duration in seconds."""
        elapsed = time.monotonic() - self._started
        self._show(force=True)
        if self._line_open:
            self._stream.write("\n")
            self._line_open = False
        self._stream.flush()
        return elapsed

    def message(self, text: str) -> None:
        """A line of its own (a warning, a note), never mixed into the progress line."""
        if not self._enabled:
            return
        if self._line_open:
            self._stream.write("\n")
            self._line_open = False
        self._stream.write(text + "\n")
        self._stream.flush()

    def _show(self, force: bool) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        interval = 0.2 if self._tty else self._log_every
        if not force and now - self._last_print < interval:
            return
        self._last_print = now
        elapsed = now - self._started
        pct = 100.0 * self._done / self._total if self._total else 100.0
        rate = f", {self._done / elapsed:,.0f} {self._unit}/s" if elapsed > 0.5 else ""
        line = f"{self._task}: {self._done:,}/{self._total:,} {self._unit} ({pct:.0f}%{rate})"
        if self._tty:
            self._stream.write("\r\x1b[K" + line)
            self._line_open = True
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
