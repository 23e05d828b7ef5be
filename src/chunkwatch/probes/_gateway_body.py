"""The ``gateway`` probe's body half: the response body counted as it is read.

:func:`async_body` / :func:`sync_body` build, for one HTTP module (httpx2 or httpx), the
counting body: a subclass of the transport's own response stream whose loop counts
(so a watched body resumes no generator more than a bare one), and a wrapper for a
stream of any other type. :func:`watch_body` notes the headers and puts one of them
under the response; :func:`cancelled` turns the watchdog's cancellation of a read into
:class:`chunkwatch.StreamStalledError`. The request half (which calls are model calls,
the span and the tally) is :mod:`chunkwatch.probes.gateway`.

Private internals of other libraries used here, each checked before use; when one is
missing or not as checked, the plain path (a wrapper over public API) is taken and
``chunkwatch_instrumentation_errors_total{layer="gateway",stage="private:..."}`` counts
every stream that took it. Checked with httpx2 2.16.2 and httpx 0.28.1 (httpcore 1.0.9)
on CPython 3.11.7; the savings are measured by ``bench/probe_instructions.py`` (figures
in ``bench/RESULTS.md``):

* ``{mod}._transports.default.ResponseStream`` / ``AsyncResponseStream`` (the
  transport's response stream), its ``_httpcore_stream`` and ``map_httpcore_exceptions``
  (:func:`_native`, :func:`watch_body`): a stream of that class is given a counting
  subclass (``__class__``) whose loop reads ``_httpcore_stream`` under the mapper, in
  place of the class's own loop, so no generator layer is added per read. Checked: the
  class's own loop reads both names. Stages: ``private:ResponseStream`` /
  ``private:AsyncResponseStream`` (class, mapper or loop not as checked),
  ``private:_httpcore_stream`` (a stream without it, or that refuses the subclass).
* ``asyncio.tasks._current_tasks`` (:func:`_task_getter`, with ``abort=True``): the
  running task read once per event from the table behind ``asyncio.current_task()``.
  Checked per stream: a dict that answers what ``current_task()`` answers. Else
  ``asyncio.current_task`` is used, counted once a stream (stage
  ``private:asyncio.tasks._current_tasks``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import nullcontext
from typing import Any

from chunkwatch import semconv as sc
from chunkwatch.errors import StreamStalledError
from chunkwatch.ledger import Tally
from chunkwatch.outcomes import End, end_for_exception
from chunkwatch.probes._wire import Reader, note_headers
from chunkwatch.probes.lifecycle import aclosing, closing
from chunkwatch.runtime import Runtime, active

__all__ = ["async_body", "cancelled", "sync_body", "watch_body"]

_now = time.perf_counter_ns
# Enum members as module globals, read per stream (why: chunkwatch.outcomes).
_CLEAN = End.CLEAN


def _stalled(tally: Tally) -> StreamStalledError | None:
    aborted = tally.aborted
    if aborted is None:
        return None
    kind, after = aborted
    return StreamStalledError(kind, after, sc.GATEWAY)


def _task_getter(tally: Tally) -> tuple[Callable[[Any], asyncio.Task[Any] | None], Any]:
    """``(get, loop)``: ``get(loop)`` is the task running now. ``asyncio.current_task()``
    looks the loop up on every call; the table behind it (private), with the loop bound
    once per stream, answers for less (``bench/probe_instructions.py``, "abort on").
    Counted once a stream: at its first read loop (the SDK reads a body again, to drain
    it, after its last event)."""
    current = getattr(asyncio.tasks, "_current_tasks", None)
    loop = asyncio.get_running_loop()
    if not isinstance(current, dict) or current.get(loop) is not asyncio.current_task():
        if not tally.bytes:  # gone, or not the truth
            _bookkeeping_error("private:asyncio.tasks._current_tasks")
        return asyncio.current_task, loop
    return current.get, loop


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _gap(mod: Any, name: str) -> str | None:
    """What of the transport's private internals is not as checked (None: all is), as a
    ``stage`` label: ``name``, the response-stream class, and ``map_httpcore_exceptions``
    in ``mod._transports.default``; the class's own loop reads ``_httpcore_stream`` under
    the mapper, and it has the close method the counting subclass calls."""
    default = getattr(getattr(mod, "_transports", None), "default", None)
    cls = getattr(default, name, None)
    if not isinstance(cls, type) or not callable(getattr(default, "map_httpcore_exceptions", 0)):
        return f"private:{name}"
    is_async = name.startswith("Async")
    loop = cls.__dict__.get("__aiter__" if is_async else "__iter__")
    names = getattr(getattr(loop, "__code__", None), "co_names", ())
    close = getattr(cls, "aclose" if is_async else "close", None)
    if not {"_httpcore_stream", "map_httpcore_exceptions"} <= set(names) or not callable(close):
        return f"private:{name}"
    return None


def _native(mod: Any, name: str) -> tuple[type | None, Callable[[], Any] | None]:
    """The transport's own response-stream class and its exception mapper, when this
    version of the module has them as checked (:func:`_gap`; else the body is wrapped)."""
    if _gap(mod, name) is not None:
        return None, None
    default = mod._transports.default
    return getattr(default, name), default.map_httpcore_exceptions


def async_body(mod: Any) -> tuple[type | None, type | None, type, str | None]:
    """``(native, adopted, wrapper, gap)`` for ``mod``'s async transport: its own response
    stream class, the counting subclass of it (None when the class is not as checked),
    the counting body that wraps a stream of any other type, and what was not as checked
    (the stage counted for every stream wrapped because of it)."""
    native, mapper = _native(mod, "AsyncResponseStream")

    class WatchedAsyncBody(mod.AsyncByteStream):  # type: ignore[misc]
        """The counting body. Wraps a response stream of any type; for the transport's
        own type, :func:`watch_body` gives the stream a subclass with this loop instead, so
        the body is read with no generator layer more than the bare path has (in the
        service every layer is resumed and suspended once per event)."""

        _errors: Callable[[], Any] = nullcontext  # the native stream: the transport's mapper

        def __init__(self, inner: Any, reader: Reader) -> None:
            self._source = inner
            self._reader = reader

        async def __aiter__(self) -> AsyncIterator[bytes]:
            # Not lifecycle.relay: its callback would be a call per read, a large share of
            # the body's cost (bench/RESULTS.md, "Tally.unit is inlined"), so the counter
            # is inlined; and the end reads the last chunk (an in-band error is read off
            # it), so the ends are written here, through the reader, an Ending.
            reader = self._reader
            tally = reader.tally
            count = reader.fast
            abortable = tally.abort is not None  # Deadlines(abort=True): know the waiting task
            if abortable:
                current_task, loop = _task_getter(tally)
            chunk = b""  # the last read, for the end: an in-band error is read off it
            try:
                if abortable:
                    tally.task = current_task(loop)  # the task that waits for the next read
                with self._errors():
                    async for chunk in self._source:
                        try:
                            if count is not None:  # Reader.feed, inlined
                                tally.bytes += len(chunk)
                                n = count(chunk)
                                if n:  # Tally.unit, inlined (bench/probe_instructions.py)
                                    now = _now()
                                    last = tally.t_last
                                    if last is None:
                                        tally.t_first = now
                                    elif now - last > tally.max_gap_ns:
                                        tally.max_gap_ns = now - last
                                    tally.t_last = now
                                    tally.units += n
                            else:  # the first reads, until the first completion chunk
                                reader.feed(chunk)
                                count = reader.fast
                        except Exception:
                            _bookkeeping_error("feed")
                        yield chunk
                        if abortable:
                            tally.task = current_task(loop)
            except asyncio.CancelledError:
                stalled = cancelled(reader)
                if stalled is None:
                    raise
                raise stalled from None
            except BaseException as exc:
                reader.end(end_for_exception(exc), exc, chunk)
                raise
            reader.end(_CLEAN, last=chunk)

        async def _close_source(self) -> None:
            await self._source.aclose()

        async def aclose(self) -> None:
            await aclosing(self._reader, self._close_source)

        def __del__(self) -> None:
            self._reader.abandon()

    adopted = _adoptive(native, mapper, WatchedAsyncBody, "aclose")
    gap = _gap(mod, "AsyncResponseStream") if adopted is None else None
    return native, adopted, WatchedAsyncBody, gap


def sync_body(mod: Any) -> tuple[type | None, type | None, type, str | None]:
    """The sync twin of :func:`async_body`."""
    native, mapper = _native(mod, "ResponseStream")

    class WatchedSyncBody(mod.SyncByteStream):  # type: ignore[misc]
        """The counting body (see the async twin)."""

        _errors: Callable[[], Any] = nullcontext

        def __init__(self, inner: Any, reader: Reader) -> None:
            self._source = inner
            self._reader = reader

        def __iter__(self) -> Iterator[bytes]:  # its own loop: see the async twin
            reader = self._reader
            tally = reader.tally
            count = reader.fast
            chunk = b""  # the last read, for the end: an in-band error is read off it
            try:
                with self._errors():
                    for chunk in self._source:
                        try:
                            if count is not None:  # Reader.feed, inlined
                                tally.bytes += len(chunk)
                                n = count(chunk)
                                if n:  # Tally.unit, inlined (bench/probe_instructions.py)
                                    now = _now()
                                    last = tally.t_last
                                    if last is None:
                                        tally.t_first = now
                                    elif now - last > tally.max_gap_ns:
                                        tally.max_gap_ns = now - last
                                    tally.t_last = now
                                    tally.units += n
                            else:  # the first reads, until the first completion chunk
                                reader.feed(chunk)
                                count = reader.fast
                        except Exception:
                            _bookkeeping_error("feed")
                        yield chunk
            except GeneratorExit:
                reader.end(End.CLOSED, last=chunk)
                raise
            except BaseException as exc:
                reader.end(end_for_exception(exc), exc, chunk)
                raise
            reader.end(_CLEAN, last=chunk)

        def _close_source(self) -> None:
            self._source.close()

        def close(self) -> None:
            closing(self._reader, self._close_source)

        def __del__(self) -> None:
            self._reader.abandon()

    adopted = _adoptive(native, mapper, WatchedSyncBody, "close")
    gap = _gap(mod, "ResponseStream") if adopted is None else None
    return native, adopted, WatchedSyncBody, gap


def _adoptive(
    native: type | None, mapper: Callable[[], Any] | None, body: type, close: str
) -> type | None:
    """A subclass of the transport's own response stream that reads with ``body``'s loop
    (its ``_source``: the httpcore stream, under the transport's exception mapping)."""
    if native is None or mapper is None:
        return None
    original_close = getattr(native, close)
    iterate = "__aiter__" if close == "aclose" else "__iter__"
    return type(
        f"Watched{native.__name__}",
        (native,),
        {
            iterate: body.__dict__[iterate],
            close: body.__dict__[close],
            "_close_source": original_close,
            "_errors": staticmethod(mapper),
            "_source": property(lambda self: self._httpcore_stream),
            "__del__": body.__dict__["__del__"],
            "__module__": __name__,
        },
    )


def watch_body(
    rt: Runtime,
    tally: Tally,
    response: Any,
    native: type | None,
    adopted: type | None,
    wrapper: Callable[..., Any],
    gap: str | None = None,
) -> None:
    """Note the headers and count the body: the transport's own stream is given the
    counting subclass (``adopted``); any other stream is wrapped. A stream wrapped
    because a private internal is not as checked (``gap``, or a stream without
    ``_httpcore_stream``) counts an instrumentation error, so the body is counted
    either way."""
    try:
        reader = Reader(tally, note_headers(rt, tally, response))
    except Exception:
        rt.bookkeeping_error(sc.GATEWAY, "headers")
        return
    stream: Any = response.stream
    if adopted is not None and type(stream) is native:
        try:
            if "_httpcore_stream" in vars(stream):
                setattr(stream, "_reader", reader)  # noqa: B010 (mypy narrows the type to object)
                stream.__class__ = adopted
                return
        except Exception:  # a class that refuses the subclass: wrapped instead
            pass
        rt.bookkeeping_error(sc.GATEWAY, "private:_httpcore_stream")
    elif gap is not None:
        rt.bookkeeping_error(sc.GATEWAY, gap)
    try:
        response.stream = wrapper(stream, reader)
    except Exception:
        rt.bookkeeping_error(sc.GATEWAY, "wrap")


def cancelled(reader: Reader) -> StreamStalledError | None:
    """A cancelled read: the watchdog's abort (the typed stall to raise instead) or the
    consumer going away (None: re-raise the cancellation)."""
    stalled = _stalled(reader.tally)
    if stalled is None:
        reader.end(End.CLOSED)
        return None
    _uncancel()
    reader.end(End.TIMEOUT, stalled)
    return stalled


def _bookkeeping_error(stage: str) -> None:
    rt = active()
    if rt is not None:
        rt.bookkeeping_error(sc.GATEWAY, stage)
