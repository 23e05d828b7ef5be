"""One stream's lifecycle, written once for every probe: its tally finishes exactly once.

A stream a probe watches ends in one of four ways — it runs out, an exception ends it,
the consumer closes it, or it is dropped and garbage-collected — and often in two of
them (a close after the end, the collector after a close). :class:`Ending` is the one
place that turns whichever comes first into one :meth:`Tally.finish
<chunkwatch.ledger.Tally.finish>`, and ignores the rest. A seam subclasses it for what
it adds: :meth:`Ending._facts` before the tally finishes (span attributes, evidence),
:meth:`Ending._ended` after (metrics, callbacks), :meth:`Ending.fail` to read an
exception differently, :meth:`Ending.clean` to raise at the end of a stream.

The shape of a relay — end of the loop: ``clean``; ``GeneratorExit`` (the consumer
closed the generator): ``closed``; any other exception: ``fail``, then the same
exception object raised on — is :meth:`Ending.__exit__`, so a counting generator is::

    with ending:
        for item in source:
            ...count...
            yield item

:func:`relay` and :func:`relay_async` are that generator with a per-item callback. A
seam whose per-item counting is inlined in its own loop (a call per item is a large
share of its cost: ``bench/probe_instructions.py``) writes the loop itself, inside
``with ending:`` or ending through the same object. :func:`closing` / :func:`aclosing`
end a stream when it is closed, :meth:`Ending.abandon_with` when its owner is collected.

Errors of the wrapped library pass through unchanged; an error in a hook is counted
(:meth:`Runtime.bookkeeping_error <chunkwatch.runtime.Runtime.bookkeeping_error>`,
stage ``finish``), never raised, and the tally finishes anyway.
"""

from __future__ import annotations

import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Generator,
    Iterable,
)
from types import TracebackType
from typing import TypeVar

from chunkwatch.ledger import Tally
from chunkwatch.outcomes import End, end_for_exception
from chunkwatch.runtime import Runtime, active

__all__ = ["Ending", "aclosing", "closing", "relay", "relay_async"]

T = TypeVar("T")
# Enum members as module globals, read per stream (why: chunkwatch.outcomes).
_CLEAN, _CLOSED, _ABANDONED = End.CLEAN, End.CLOSED, End.ABANDONED


class Ending:
    """Finishes ``tally`` once, whichever path reaches :meth:`end` first.

    ``rt``: where a hook's error is counted (None: the active runtime's).
    """

    __slots__ = ("_done", "rt", "tally")

    def __init__(self, tally: Tally, rt: Runtime | None = None) -> None:
        self.tally = tally
        self.rt = rt
        self._done = False

    def end(self, end: End, exc: BaseException | None = None) -> None:
        """Finish the tally as ``end`` (``exc``: the exception that ended it), once. A
        tally finished elsewhere (the request's end finishes a stalled one) is left as
        it is."""
        tally = self.tally
        if self._done or tally.outcome is not None:
            return
        self._done = True  # before the hooks: one of them ending again is a no-op
        if exc is not None:
            tally.exc_type = type(exc).__name__
        try:
            self._facts(end, exc)
        except Exception:
            self.bookkeeping_error("finish")
        tally.finish(end)
        try:
            self._ended(end)
        except Exception:
            self.bookkeeping_error("finish")

    def _facts(self, end: End, exc: BaseException | None) -> None:
        """Before the tally finishes: what the seam noted, onto the tally and its span."""

    def _ended(self, end: End) -> None:
        """After the tally finished (its outcome is known): metrics, callbacks."""

    def fail(self, exc: BaseException) -> None:
        """``exc`` ended the stream: end with what it says. A seam may raise another
        exception here in its place; returning re-raises ``exc`` unchanged."""
        self.end(end_for_exception(exc), exc)

    def clean(self) -> BaseException | None:
        """The stream ran out: end ``clean``; returns an error to raise in place of
        stopping (None: stop)."""
        self.end(_CLEAN)
        return None

    def abandon(self) -> None:
        """Garbage-collected before it ended (a no-op if it did)."""
        self.end(_ABANDONED)

    def abandon_with(self, owner: object) -> None:
        """End ``abandoned`` when ``owner`` is collected, if nothing ended it before."""
        weakref.finalize(owner, self.abandon)

    def __enter__(self) -> Ending:
        return self

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            error = self.clean()
            if error is not None:
                raise error
        elif isinstance(exc, GeneratorExit):
            self.end(_CLOSED)
        else:
            self.fail(exc)

    def bookkeeping_error(self, stage: str) -> None:
        """Count an error of chunkwatch's own at ``stage`` of this stream's layer."""
        rt = self.rt or active()
        if rt is not None:
            rt.bookkeeping_error(self.tally.layer, stage)


def relay(
    source: Iterable[T], ending: Ending, see: Callable[[T], object], owner: object = None
) -> Generator[T, None, None]:
    """``source``'s items passed on, each given to ``see`` first (its error is counted,
    the item passes anyway); ends ``ending`` once. ``owner`` lives as long as the relay
    (the stream whose iterator ``source`` is, when nothing else holds it)."""
    with ending:
        for item in source:
            try:
                see(item)
            except Exception:
                ending.bookkeeping_error("chunk")
            yield item


async def relay_async(
    source: AsyncIterable[T], ending: Ending, see: Callable[[T], object], owner: object = None
) -> AsyncGenerator[T, None]:
    """The async twin of :func:`relay`."""
    with ending:
        async for item in source:
            try:
                see(item)
            except Exception:
                ending.bookkeeping_error("chunk")
            yield item


def closing(ending: Ending, close: Callable[[], object] | None, end: End = End.CLOSED) -> None:
    """Close the wrapped stream (``close``: its own), then end: ``closed``, or ``end``.
    The stream ends even when its close raises; that error passes on."""
    try:
        if close is not None:
            close()
    finally:
        ending.end(end)


async def aclosing(ending: Ending, close: Callable[[], Awaitable[object]]) -> None:
    """The async twin of :func:`closing`."""
    try:
        await close()
    finally:
        ending.end(_CLOSED)
