"""The ``http`` probe: the inbound request, from its first byte to its last.

Seam: the WSGI application (for Flask, where the server calls the app, outside
whatever wraps ``app.wsgi_app``: :func:`chunkwatch.integrations.flask.instrument_app`).
For every request it creates the request's :class:`~chunkwatch.ledger.Ledger` (``environ
["chunkwatch.ledger"]``; :func:`request_ledger` inside a Flask view) and the
server span ``{method} {route}``, continuing a W3C ``traceparent`` if the client
sent one. For ``text/event-stream`` responses it wraps the body in the ``sse``
probe, and the server span ends only after the last byte — or the disconnect.

When the body ends, the verdict is drawn (:meth:`Runtime.finish_request`): it
goes on the server span, in one log line, and in
``chunkwatch_requests_total`` (event-stream responses only, so health checks and
metric scrapes do not count as requests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import INVALID_SPAN, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from chunkwatch import semconv as sc
from chunkwatch.browser import Beacons, from_browser, terminal_written
from chunkwatch.ledger import Ledger, Tally
from chunkwatch.ledger import _current as _current_ledger
from chunkwatch.outcomes import End
from chunkwatch.probes.lifecycle import Ending, closing
from chunkwatch.probes.sse_out import SSEBody
from chunkwatch.runtime import Runtime, active
from chunkwatch.spans import tracing

__all__ = ["ChunkwatchMiddleware", "flask_module", "request_ledger"]

ENVIRON_KEY = "chunkwatch.ledger"
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# Enum members as module globals, read per stream (why: chunkwatch.outcomes).
_CLEAN, _CLOSED, _SERVER = End.CLEAN, End.CLOSED, SpanKind.SERVER


def request_ledger() -> Ledger | None:
    """The ledger of the Flask request being handled (None outside one, or uninstrumented)."""
    flask = flask_module()
    if not flask.has_request_context():
        return None
    ledger: Ledger | None = flask.request.environ.get(ENVIRON_KEY)
    return ledger


_flask: Any = None


def flask_module() -> Any:
    """Flask, imported on first use (a WSGI app need not be Flask's): the Flask-only
    functions called in every request read it here, not by an import statement each
    call (``from flask import ...`` runs the import machinery's fromlist handling)."""
    global _flask
    if _flask is None:
        import flask

        _flask = flask
    return _flask


class _EnvironGetter(Getter[dict[str, Any]]):
    def __init__(self) -> None:
        self._names: dict[str, str] = {}  # header -> environ key: the propagators ask the same

    def get(self, carrier: dict[str, Any], key: str) -> list[str] | None:
        name = self._names.get(key)
        if name is None:
            name = self._names[key] = "HTTP_" + key.upper().replace("-", "_")
        value = carrier.get(name)
        return [value] if value is not None else None

    def keys(self, carrier: dict[str, Any]) -> list[str]:
        return [k[5:].lower().replace("_", "-") for k in carrier if k.startswith("HTTP_")]


_GETTER = _EnvironGetter()

# The API's default propagators (W3C trace context and baggage) read only these headers: a
# request without any has nothing to extract, and most requests have none.
_W3C_KEYS = ("HTTP_TRACEPARENT", "HTTP_TRACESTATE", "HTTP_BAGGAGE")
_W3C_TYPES = (TraceContextTextMapPropagator, W3CBaggagePropagator)
_NOTHING = Context()  # what extract() answers for no headers: a root context (immutable)
_w3c_only: tuple[object, bool] = (None, False)  # (the global propagator, it is the default)


def _extract(environ: dict[str, Any]) -> Context:
    """``propagate.extract(environ)``, without the propagators' calls for a request that
    carries none of their headers, when they are the default ones."""
    global _w3c_only
    textmap = propagate.get_global_textmap()
    seen, w3c = _w3c_only
    if seen is not textmap:
        # CompositePropagator._propagators is private (opentelemetry-api, checked 1.30 ..
        # 1.45): without it every request is extracted, as before.
        members = getattr(textmap, "_propagators", None)
        w3c = type(textmap) is CompositePropagator and bool(members)
        w3c = w3c and all(type(m) in _W3C_TYPES for m in members or ())
        _w3c_only = (textmap, w3c)
    if w3c and environ.keys().isdisjoint(_W3C_KEYS):  # one C call, not a generator
        return _NOTHING
    return propagate.extract(environ, getter=_GETTER)


class ChunkwatchMiddleware:
    """WSGI middleware: the ``http`` and ``sse`` probes for any WSGI app."""

    def __init__(
        self,
        app: WSGIApp,
        runtime: Runtime | None = None,
        *,
        skip_paths: Iterable[str] = (),
        beacons: Beacons | None = None,
    ) -> None:
        self.app = app
        self.beacons = beacons  # the beacon endpoint and SSE stream tokens; None: off
        self._runtime = runtime
        self._skip = frozenset(skip_paths)  # e.g. the metrics path: a scrape is not a request
        self.enabled = True  # False: left in place by uninstrument (another wrapper is above)
        if self._runtime is not None:
            self._runtime.serving = True

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        rt = self._runtime or active()
        path = environ.get("PATH_INFO")
        if rt is None or not self.enabled or path in self._skip:
            return self.app(environ, start_response)
        beacons = self.beacons
        if beacons is not None and path is not None and beacons.handles(path):
            return beacons(rt, environ, start_response)  # not a request of the service's
        try:
            ledger, tally = self._open(rt, environ)
        except Exception:
            rt.bookkeeping_error(sc.HTTP, "open")
            return self.app(environ, start_response)
        request = _Request(rt, ledger, tally, environ.get("REQUEST_METHOD", "GET"))
        if beacons is not None and from_browser(environ):  # else no token: nobody beacons
            request.beacons = beacons

        def _start_response(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            request.started(status, headers)
            return start_response(status, headers, *exc)

        # The ledger is current while the view runs (and, in the sse probe, while the body
        # is iterated): asyncio tasks, threads and executor work started from here find it.
        token = _current_ledger.set(ledger)
        try:
            span = tally.span
            # The no-op tracer's: current already (an invalid span is ours only when no
            # valid one was current, see _open: nothing to make current).
            if span is None or span is INVALID_SPAN or span is trace.get_current_span():
                body = self.app(environ, _start_response)
            else:
                with trace.use_span(
                    span, end_on_exit=False, record_exception=False, set_status_on_exception=False
                ):
                    body = self.app(environ, _start_response)
        except BaseException as exc:
            request.end(End.ERROR, exc)
            raise
        finally:
            _current_ledger.reset(token)
        return request.wrap(body)

    def _open(self, rt: Runtime, environ: dict[str, Any]) -> tuple[Ledger, Tally]:
        ledger = Ledger()
        environ[ENVIRON_KEY] = ledger
        parent: Any = _extract(environ)
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        kind = _SERVER
        if trace.get_current_span().get_span_context().is_valid:
            # Another tool's server span (OpenTelemetry's WSGI middleware outside ours)
            # is this request's: ours is a child of it, as OTel's own do in that case.
            parent, kind = None, SpanKind.INTERNAL
        if tracing(rt):
            attrs = _server_attributes(environ, method, path)
            span = rt.start_span(method, sc.HTTP, kind=kind, context=parent, attributes=attrs)
        elif parent is _NOTHING:  # what the no-op tracer would answer, without asking it
            span = INVALID_SPAN
        else:
            span = rt.start_span(method, sc.HTTP, kind=kind, context=parent)
        if span is not None and (span is not INVALID_SPAN or parent is not _NOTHING):
            # (an invalid span in an empty context: nothing for new work to parent to)
            ledger.parent_context = trace.set_span_in_context(span)
        # The span ends after the verdict went on it (_Request.end), not with the tally.
        tally = rt.open(sc.HTTP, ledger=ledger, span=span, watch=False, keep_span=True)
        return ledger, tally


def _server_attributes(environ: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    """The HTTP server span's attributes (HTTP semantic conventions, stable): the required
    ones and the recommended ones a WSGI environ has."""
    attrs: dict[str, Any] = {
        sc.HTTP_REQUEST_METHOD: method,
        sc.URL_PATH: path,
        sc.URL_SCHEME: environ.get("wsgi.url_scheme", "http"),
    }
    host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME")
    if host:
        name, sep, port = host.rpartition(":")
        if not (sep and port.isdigit()):
            name, port = host, ""
        attrs[sc.SERVER_ADDRESS] = name.strip("[]")
        if port:
            attrs[sc.SERVER_PORT] = int(port)
    if environ.get("REMOTE_ADDR"):
        attrs[sc.CLIENT_ADDRESS] = environ["REMOTE_ADDR"]
    if environ.get("HTTP_USER_AGENT"):
        attrs[sc.USER_AGENT_ORIGINAL] = environ["HTTP_USER_AGENT"][:256]
    protocol = environ.get("SERVER_PROTOCOL", "")
    if protocol.startswith("HTTP/"):
        attrs[sc.NETWORK_PROTOCOL_VERSION] = protocol[5:]
    return attrs


class _Request(Ending):
    """One request's http tally; ends it exactly once and draws the verdict."""

    rt: Runtime

    def __init__(self, rt: Runtime, ledger: Ledger, tally: Tally, method: str) -> None:
        super().__init__(tally, rt)
        self.ledger, self.method = ledger, method
        self.status = 0
        self.streaming = False
        self.beacons: Beacons | None = None
        self.stream_token: str | None = None  # X-Chunkwatch-Stream, for an SSE response
        self.body: SSEBody | None = None

    def started(self, status: str, headers: list[tuple[str, str]]) -> None:
        try:
            self.status = int(status.split(" ", 1)[0])
            for name, value in headers:
                if name.lower() == "content-type":
                    self.streaming = value.lower().startswith("text/event-stream")
            if self.streaming and self.beacons is not None:
                self.stream_token = self.beacons.stream_headers(headers)
            span = self.tally.span
            if span is not None and span is not INVALID_SPAN:  # (that one drops them)
                span.set_attribute(sc.HTTP_RESPONSE_STATUS_CODE, self.status)
                if self.status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
        except Exception:
            self.rt.bookkeeping_error(sc.HTTP, "start_response")

    def wrap(self, body: Iterable[bytes]) -> Iterable[bytes]:
        if self.streaming:
            self.body = SSEBody(body, self.rt, self.ledger, on_end=self._body_ended)
            return self.body
        return _PlainBody(body, self)

    def _body_ended(self, end: End) -> None:
        self.end(_CLOSED if end is _CLOSED else _CLEAN)

    def _facts(self, end: End, exc: BaseException | None) -> None:
        tally = self.tally
        if not self.streaming:
            tally.stream_metrics = False  # a span, but no stream metrics
        if self.status >= 500:
            tally.status = self.status
        tally.unit()
        span = tally.span
        route = self.ledger.route
        if span is not None and route and span.is_recording():
            span.update_name(f"{self.method} {route}")
            span.set_attribute(sc.HTTP_ROUTE, route)

    def _ended(self, end: End) -> None:
        span = self.tally.span
        if not self.streaming:
            try:
                if span is not None:
                    span.end()
            except Exception:
                self.bookkeeping_error("span")
            return
        if span is not None and span.is_recording():
            span.set_attribute(sc.A_CHUNKS, self.ledger.units(sc.SSE))
        # Ends the span: now, or once model streams its departed client left running stop.
        verdict = self.rt.finish_request(self.ledger, span)
        if self.stream_token is not None and self.beacons is not None and self.body is not None:
            try:
                terminal = terminal_written(self.body.last_chunk)
                self.beacons.stream_ended(
                    self.rt, self.stream_token, self.ledger, verdict, terminal=terminal
                )
            except Exception:
                self.rt.bookkeeping_error(sc.BROWSER, "record")


class _PlainBody:
    """A non-streaming body: the request ends when the server closes it."""

    def __init__(self, body: Iterable[bytes], request: _Request) -> None:
        self._body, self._request = body, request

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        closing(self._request, getattr(self._body, "close", None), End.CLEAN)
