"""A progress line on stderr while the doctor waits on a slow endpoint.

Each measurement says what it is waiting for (:meth:`Progress.waiting`); a ticker
task (:meth:`Progress.run`) writes a line once a wait has lasted ``after`` seconds.
On a terminal the line is redrawn in place (``\\r``) and erased when the wait ends;
elsewhere (CI logs, a pipe) a plain line is written when the wait passes ``after``
and then every ``every`` seconds. Standard output is never touched, so ``--json``
stays machine-readable.
"""

from __future__ import annotations

import asyncio
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """What the doctor is waiting for now, shown once the wait is slow."""

    def __init__(
        self,
        stream: TextIO | None,
        *,
        after: float = 1.0,
        every: float = 5.0,
        tick: float = 0.2,
        tty: bool | None = None,
    ) -> None:
        self._stream = stream
        self._after = after
        self._every = every
        self._tick = tick
        self._tty = bool(tty if tty is not None else stream is not None and stream.isatty())
        self._label: str | None = None
        self._since = 0.0
        self._shown_at: float | None = None  # when the last line for this wait was written
        self._drawn = False  # a terminal line is on screen
        self.lines = 0  # lines written (tests read this)

    def waiting(self, label: str) -> None:
        """From now on the doctor waits for ``label`` (e.g. "step 2: the first event")."""
        if label == self._label:
            return
        self._clear()
        self._label = label
        self._since = time.monotonic()
        self._shown_at = None

    def done(self) -> None:
        """Nothing is awaited any more."""
        self._clear()
        self._label = None

    def check(self, now: float | None = None) -> None:
        """Write the line if the current wait is slow (the ticker calls this)."""
        if self._stream is None or self._label is None:
            return
        now = time.monotonic() if now is None else now
        waited = now - self._since
        if waited < self._after:
            return
        text = f"chunkwatch doctor: waiting for {self._label} ... {waited:.1f} s"
        if self._tty:
            self._stream.write(f"\r\x1b[K{text}")
            self._drawn = True
        elif self._shown_at is None or now - self._shown_at >= self._every:
            self._stream.write(text + "\n")
        else:
            return
        self._shown_at = now
        self.lines += 1
        self._stream.flush()

    async def run(self) -> None:
        """Tick until cancelled."""
        try:
            while True:
                await asyncio.sleep(self._tick)
                self.check()
        finally:
            self.done()

    def _clear(self) -> None:
        if self._drawn and self._stream is not None:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
        self._drawn = False
