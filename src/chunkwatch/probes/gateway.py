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
more than the bare one does; a stream of another type is wrapped. That subclass
reads private internals of httpx2 / httpx, checked before use: where they are not
as checked, every body is wrapped and counted in
``chunkwatch_instrumentation_errors_total{layer="gateway",stage="private:..."}``
(the list, and the versions checked: :mod:`chunkwatch.probes._gateway_body`).

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
from collections.abc import Callable
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import INVALID_SPAN, SpanKind

from chunkwatch import semconv as sc
from chunkwatch.ledger import Ledger, Tally
from chunkwatch.patching import patch, unpatch
from chunkwatch.probes._gateway_body import async_body, cancelled, sync_body, watch_body
from chunkwatch.probes._wire import Reader
from chunkwatch.runtime import Runtime, active
from chunkwatch.spans import noop_span, tracing

__all__ = ["instrument", "uninstrument"]

_OWNER = "chunkwatch.gateway"
_MODEL_PATHS = ("/chat/completions", "/completions", "/responses")
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')


def _is_model_call(request: Any) -> bool:
    return bool(request.method == "POST" and request.url.path.endswith(_MODEL_PATHS))


def _stream_requested(request: Any) -> bool:
    try:
        body = request.content
    except Exception:  # a streaming request body we cannot peek at
        return True
    # A search for the key, then the regex only where it is: cheaper than a regex search.
    at = body.find(b'"stream"')
    while at >= 0:
        if _STREAM_RE.match(body, at):
            return True
        at = body.find(b'"stream"', at + 8)
    return False


def _open(rt: Runtime, request: Any) -> Tally:
    url = request.url
    upstream = rt.upstream_for(f"{url.scheme}://{url.host}:{url.port or ''}")
    ledger = rt.ledger(sc.GATEWAY)
    if tracing(rt):
        span = _span(rt, request, upstream, ledger)
    else:  # the no-op tracer: its span is the current one, or the request's
        span = noop_span(None, ledger)
        if span is not INVALID_SPAN and span.get_span_context().is_valid:
            if not _client_span_above(request):  # a trace to carry on, nobody sent it yet
                _inject(rt, request, span)
    stream = _stream_requested(request)
    return rt.open(
        sc.GATEWAY,
        ledger=ledger,
        upstream=upstream,
        span=span,
        stream_requested=stream,
        terminal_known=stream,
        needs_status=True,
        watch=stream,  # a buffered answer has no first chunk before the whole generation
    )


def _span(rt: Runtime, request: Any, upstream: str, ledger: Ledger) -> Any:
    """The model call's span, with its attributes, for a tracer that keeps them."""
    url = request.url
    attributes: dict[str, Any] = {
        sc.HTTP_REQUEST_METHOD: request.method,
        sc.SERVER_ADDRESS: url.host,
        sc.SERVER_PORT: url.port or (443 if url.scheme == "https" else 80),
        sc.URL_SCHEME: url.scheme,
        sc.URL_PATH: url.path,
        sc.A_UPSTREAM: upstream,
    }
    if _client_span_above(request):
        # Another instrumentation (OpenTelemetry's httpx / httpx2) owns this request's
        # CLIENT span, ends it at the response headers and propagated its context:
        # the body's facts go on a child of it.
        return rt.start_span(sc.SPAN_GATEWAY_BODY, sc.GATEWAY, attributes=attributes, ledger=ledger)
    attributes[sc.URL_FULL] = rt.redacted_url(url)
    span = rt.start_span(
        f"POST {_operation(url.path)}",
        sc.GATEWAY,
        kind=SpanKind.CLIENT,
        attributes=attributes,
        ledger=ledger,
    )
    if span is not None and span.get_span_context().is_valid:  # invalid: nothing to send
        _inject(rt, request, span)
    return span


def _client_span_above(request: Any) -> bool:
    """True when an HTTP client span of another instrumentation covers this request: the
    current span is an HTTP CLIENT span (chunkwatch sits beneath other tools' patches; a
    GenAI ``chat`` span is a CLIENT span too, but has no HTTP method), or the request
    already carries a ``traceparent`` (sampled out, the span is not readable)."""
    current = trace.get_current_span()
    if getattr(current, "kind", None) is SpanKind.CLIENT:
        attributes = getattr(current, "attributes", None) or {}
        if sc.HTTP_REQUEST_METHOD in attributes or "http.method" in attributes:
            return True
    return "traceparent" in request.headers


def _inject(rt: Runtime, request: Any, span: Any) -> None:
    """Propagate this CLIENT span's context (``traceparent``, through the configured
    propagators) on the outgoing request, as an HTTP client instrumentation does."""
    try:
        propagate.inject(request.headers, context=trace.set_span_in_context(span))
    except Exception:
        rt.bookkeeping_error(sc.GATEWAY, "inject")


def _operation(path: str) -> str:
    for suffix in _MODEL_PATHS:
        if path.endswith(suffix):
            return suffix
    return path


def _set_abort(tally: Tally) -> None:
    """Let the watchdog cancel the task now waiting on this stream; the probe turns that
    into StreamStalledError. The waiting task changes: langchain-openai reads each chunk
    in a task of its own (``asyncio.wait_for``), so the body records it at every read."""
    tally.task = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def cancel() -> None:
        task = tally.task  # the body notes each read's task
        if task is not None and not task.done():
            task.cancel()

    def abort() -> None:
        loop.call_soon_threadsafe(cancel)

    tally.abort = abort


def _make_async(mod: Any) -> Callable[[Any], Any]:
    native, adopted, wrapper, gap = async_body(mod)

    def make(original: Any) -> Any:
        async def handle_async_request(self: Any, request: Any) -> Any:
            rt = active()
            tally = _start(rt, request, aborts=True)
            if rt is None or tally is None:
                return await original(self, request)
            try:
                response = await original(self, request)
            except asyncio.CancelledError:
                stalled = cancelled(Reader(tally, None))
                if stalled is None:
                    raise
                raise stalled from None
            except BaseException as exc:
                Reader(tally, None).fail(exc)
                raise
            watch_body(rt, tally, response, native, adopted, wrapper, gap)
            return response

        return handle_async_request

    return make


def _make_sync(mod: Any) -> Callable[[Any], Any]:
    native, adopted, wrapper, gap = sync_body(mod)

    def make(original: Any) -> Any:
        def handle_request(self: Any, request: Any) -> Any:
            rt = active()
            tally = _start(rt, request, aborts=False)
            if rt is None or tally is None:
                return original(self, request)
            try:
                response = original(self, request)
            except BaseException as exc:
                Reader(tally, None).fail(exc)
                raise
            watch_body(rt, tally, response, native, adopted, wrapper, gap)
            return response

        return handle_request

    return make


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
