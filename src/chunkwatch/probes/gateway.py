"""The ``gateway`` probe: what actually came over HTTP from the gateway or model.

Seam: the HTTP transport under the openai SDK — ``httpx2`` (openai 3.x) and, when
installed, ``httpx`` (openai 1.x) — ``HTTPTransport.handle_request`` and
``AsyncHTTPTransport.handle_async_request``. Only model calls are watched (paths
ending in ``/chat/completions``, ``/completions`` or ``/responses``).

The span and the tally cover the response **body**, not just the headers: the
span ``POST /chat/completions`` (kind CLIENT) ends when the body ends, is
closed, or is abandoned. The body is read with the shared strict SSE parser in
counting mode; the unit is a ``data:`` event (``[DONE]`` noted, not counted).
The transport's own response stream is counted in its own loop (the stream is
given a subclass of its class), so reading a watched body resumes no generator
more than the bare one does; a stream of another type is wrapped.

Facts noted once: status, content-type, content-length, transfer-encoding,
content-encoding, gateway request ids, time to headers / first byte / first
event, bytes, comments, ``[DONE]``, malformed payloads, end kind. Request and
response header *values* other than those are never read: no Authorization,
no ``api-key``.

With ``Deadlines(abort=True)`` a stalled async stream is aborted with
:class:`chunkwatch.StreamStalledError` (a ``ReadTimeout``; the SDK raises
``APITimeoutError`` from it).

Usage::

    from chunkwatch.probes import gateway
    gateway.instrument(runtime)   # idempotent
    gateway.uninstrument()
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import nullcontext
from typing import Any

from opentelemetry.trace import SpanKind

from chunkwatch import semconv as sc
from chunkwatch.errors import StreamStalledError
from chunkwatch.ledger import Tally
from chunkwatch.outcomes import End, end_for_exception
from chunkwatch.probes._patch import patch, unpatch
from chunkwatch.probes._wire import Reader, note_headers
from chunkwatch.runtime import Runtime, active

__all__ = ["instrument", "uninstrument"]

_OWNER = "chunkwatch.gateway"
_MODEL_PATHS = ("/chat/completions", "/completions", "/responses")
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_now = time.perf_counter_ns


def _is_model_call(request: Any) -> bool:
    return bool(request.method == "POST" and request.url.path.endswith(_MODEL_PATHS))


def _stream_requested(request: Any) -> bool:
    try:
        body = request.content
    except Exception:  # a streaming request body we cannot peek at
        return True
    return bool(_STREAM_RE.search(body))


def _open(rt: Runtime, request: Any) -> Tally:
    url = request.url
    upstream = rt.upstream_for(f"{url.scheme}://{url.host}:{url.port or ''}")
    span = rt.start_span(
        f"POST {_operation(url.path)}",
        sc.GATEWAY,
        kind=SpanKind.CLIENT,
        attributes={
            sc.HTTP_REQUEST_METHOD: request.method,
            sc.SERVER_ADDRESS: url.host,
            sc.SERVER_PORT: url.port or (443 if url.scheme == "https" else 80),
            sc.URL_SCHEME: url.scheme,
            sc.URL_PATH: url.path,
            sc.A_UPSTREAM: upstream,
        },
    )
    stream = _stream_requested(request)
    return rt.open(
        sc.GATEWAY,
        upstream=upstream,
        span=span,
        stream_requested=stream,
        terminal_known=stream,
        needs_status=True,
        watch=stream,  # a buffered answer has no first chunk before the whole generation
    )


def _operation(path: str) -> str:
    for suffix in _MODEL_PATHS:
        if path.endswith(suffix):
            return suffix
    return path


def _stalled(tally: Tally) -> StreamStalledError | None:
    aborted = tally.facts.get("aborted")
    if aborted is None:
        return None
    kind, after = aborted
    return StreamStalledError(kind, after, sc.GATEWAY)


def _set_abort(tally: Tally) -> None:
    """Let the watchdog cancel the task now waiting on this stream; the probe turns that
    into StreamStalledError. The waiting task changes: langchain-openai reads each chunk
    in a task of its own (``asyncio.wait_for``), so the body records it at every read."""
    tally.facts["task"] = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def cancel() -> None:
        task = tally.facts.get("task")
        if task is not None and not task.done():
            task.cancel()

    tally.facts["abort"] = lambda: loop.call_soon_threadsafe(cancel)


def _task_getter() -> tuple[Callable[[Any], asyncio.Task[Any] | None], Any]:
    """``(get, loop)``: ``get(loop)`` is the task running now. On 3.11
    ``asyncio.current_task()`` is Python code that looks the loop up on every call
    (≈250 ns a read); the table behind it, with the loop bound once per stream, answers
    in ≈40 ns."""
    current = getattr(asyncio.tasks, "_current_tasks", None)
    loop = asyncio.get_running_loop()
    if not isinstance(current, dict) or current.get(loop) is not asyncio.current_task():
        return asyncio.current_task, loop  # a Python where the table is gone or not the truth
    return current.get, loop


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _native(mod: Any, name: str) -> tuple[type | None, Callable[[], Any] | None]:
    """The transport's own response-stream class and its exception mapper, when this
    version of the module has them where we expect (else the body is wrapped instead)."""
    default = getattr(getattr(mod, "_transports", None), "default", None)
    cls = getattr(default, name, None)
    mapper = getattr(default, "map_httpcore_exceptions", None)
    if isinstance(cls, type) and callable(mapper):
        return cls, mapper
    return None, None


def _make_async(mod: Any) -> Callable[[Any], Any]:
    native, mapper = _native(mod, "AsyncResponseStream")

    class WatchedAsyncBody(mod.AsyncByteStream):  # type: ignore[misc]
        """The counting body. Wraps a response stream of any type; for the transport's
        own type, :func:`_adopt` gives the stream a subclass with this loop instead, so
        the body is read with no generator layer more than the bare path has (in the
        service every layer is resumed and suspended once per event)."""

        _errors: Callable[[], Any] = nullcontext  # the native stream: the transport's mapper

        def __init__(self, inner: Any, reader: Reader) -> None:
            self._source = inner
            self._reader = reader

        async def __aiter__(self) -> AsyncIterator[bytes]:
            reader = self._reader
            tally = reader.tally
            facts, count = tally.facts, reader.counter()
            current_task, loop = _task_getter()
            abortable = "abort" in facts  # Deadlines(abort=True): know the waiting task
            try:
                if abortable:
                    facts["task"] = current_task(loop)  # the task that waits for the next read
                with self._errors():
                    async for chunk in self._source:
                        try:
                            if count is not None and tally.bytes:  # Reader.feed, inlined
                                tally.bytes += len(chunk)
                                n = count(chunk)
                                if n:  # Tally.unit, inlined: the call costs a third of it
                                    now = _now()
                                    last = tally.t_last
                                    if last is None:
                                        tally.t_first = now
                                    elif now - last > tally.max_gap_ns:
                                        tally.max_gap_ns = now - last
                                    tally.t_last = now
                                    tally.units += n
                            else:
                                reader.feed(chunk)
                        except Exception:
                            _bookkeeping_error("feed")
                        yield chunk
                        if abortable:
                            facts["task"] = current_task(loop)
            except asyncio.CancelledError:
                stalled = _cancelled(reader)
                if stalled is None:
                    raise
                raise stalled from None
            except BaseException as exc:
                reader.end(end_for_exception(exc), exc)
                raise
            reader.end(End.CLEAN)

        async def _close_source(self) -> None:
            await self._source.aclose()

        async def aclose(self) -> None:
            try:
                await self._close_source()
            finally:
                self._reader.end(End.CLOSED)

        def __del__(self) -> None:
            if not self._reader.tally.finished:
                self._reader.end(End.ABANDONED)

    adopted = _adoptive(native, mapper, WatchedAsyncBody, "aclose")

    def make(original: Any) -> Any:
        async def handle_async_request(self: Any, request: Any) -> Any:
            rt = active()
            tally = _start(rt, request, aborts=True)
            if rt is None or tally is None:
                return await original(self, request)
            try:
                response = await original(self, request)
            except asyncio.CancelledError:
                stalled = _cancelled(Reader(tally, None))
                if stalled is None:
                    raise
                raise stalled from None
            except BaseException as exc:
                Reader(tally, None).end(end_for_exception(exc), exc)
                raise
            _watch_body(rt, tally, response, native, adopted, WatchedAsyncBody)
            return response

        return handle_async_request

    return make


def _make_sync(mod: Any) -> Callable[[Any], Any]:
    native, mapper = _native(mod, "ResponseStream")

    class WatchedSyncBody(mod.SyncByteStream):  # type: ignore[misc]
        """The counting body (see the async twin)."""

        _errors: Callable[[], Any] = nullcontext

        def __init__(self, inner: Any, reader: Reader) -> None:
            self._source = inner
            self._reader = reader

        def __iter__(self) -> Iterator[bytes]:
            reader = self._reader
            tally = reader.tally
            count = reader.counter()
            try:
                with self._errors():
                    for chunk in self._source:
                        try:
                            if count is not None and tally.bytes:  # Reader.feed, inlined
                                tally.bytes += len(chunk)
                                n = count(chunk)
                                if n:  # Tally.unit, inlined: the call costs a third of it
                                    now = _now()
                                    last = tally.t_last
                                    if last is None:
                                        tally.t_first = now
                                    elif now - last > tally.max_gap_ns:
                                        tally.max_gap_ns = now - last
                                    tally.t_last = now
                                    tally.units += n
                            else:
                                reader.feed(chunk)
                        except Exception:
                            _bookkeeping_error("feed")
                        yield chunk
            except GeneratorExit:
                reader.end(End.CLOSED)
                raise
            except BaseException as exc:
                reader.end(end_for_exception(exc), exc)
                raise
            reader.end(End.CLEAN)

        def _close_source(self) -> None:
            self._source.close()

        def close(self) -> None:
            try:
                self._close_source()
            finally:
                self._reader.end(End.CLOSED)

        def __del__(self) -> None:
            if not self._reader.tally.finished:
                self._reader.end(End.ABANDONED)

    adopted = _adoptive(native, mapper, WatchedSyncBody, "close")

    def make(original: Any) -> Any:
        def handle_request(self: Any, request: Any) -> Any:
            rt = active()
            tally = _start(rt, request, aborts=False)
            if rt is None or tally is None:
                return original(self, request)
            try:
                response = original(self, request)
            except BaseException as exc:
                Reader(tally, None).end(end_for_exception(exc), exc)
                raise
            _watch_body(rt, tally, response, native, adopted, WatchedSyncBody)
            return response

        return handle_request

    return make


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


def _start(rt: Runtime | None, request: Any, *, aborts: bool) -> Tally | None:
    """The tally of a model call (None: not one, not instrumented, or bookkeeping failed)."""
    if rt is None or not _is_model_call(request):
        return None
    try:
        tally = _open(rt, request)
        if aborts and rt.deadlines.abort:
            _set_abort(tally)
        return tally
    except Exception:
        rt.bookkeeping_error(sc.GATEWAY, "open")
        return None


def _watch_body(
    rt: Runtime,
    tally: Tally,
    response: Any,
    native: type | None,
    adopted: type | None,
    wrapper: Callable[..., Any],
) -> None:
    """Note the headers and count the body: the transport's own stream is given the
    counting subclass (``adopted``); any other stream is wrapped."""
    try:
        reader = Reader(tally, note_headers(rt, tally, response))
        stream: Any = response.stream
        if adopted is not None and type(stream) is native:
            setattr(stream, "_reader", reader)  # noqa: B010 (mypy narrows the type to object)
            stream.__class__ = adopted
        else:
            response.stream = wrapper(stream, reader)
    except Exception:
        rt.bookkeeping_error(sc.GATEWAY, "headers")


def _cancelled(reader: Reader) -> StreamStalledError | None:
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


def _modules() -> list[Any]:
    mods = []
    for name in ("httpx2", "httpx"):
        try:
            mods.append(__import__(name))
        except ImportError:
            continue
    return mods


def instrument(runtime: Runtime | None = None) -> None:
    """Patch the transports of httpx2 and httpx (whichever are installed). Idempotent."""
    for mod in _modules():
        patch(_OWNER, mod.AsyncHTTPTransport, "handle_async_request", _make_async(mod))
        patch(_OWNER, mod.HTTPTransport, "handle_request", _make_sync(mod))


def uninstrument() -> None:
    unpatch(_OWNER)
