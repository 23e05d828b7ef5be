"""``chunkwatch.instrument(...)``: every probe at once, and its inverse.

Usage (an existing Flask + LangGraph service)::

    import chunkwatch

    app = Flask(__name__)
    chunkwatch.instrument(app)   # or: opentelemetry-instrument + chunkwatch.instrument(app)

That one line gives the request verdict for the hand-offs services use (a shared
loop fed by ``run_coroutine_threadsafe``, a thread per request, executors, sync
``graph.stream`` in the response): see :mod:`chunkwatch.handoff`. The explicit API
(``request_ledger``, ``bind``, ``WatchedQueue``) adds the queue layer and links
shapes nothing can follow (docs/instrumentation.md, "What each level gives").

Configuration — each option also from the environment (:mod:`chunkwatch.config`);
an argument wins over its variable:

* ``registry`` — the Prometheus registry (default: the global one).
* ``tracer_provider`` — default: the global one.
* ``upstreams`` — ``{host | host:port | URL prefix: name}`` for the ``upstream`` label
  (``CHUNKWATCH_UPSTREAMS``).
* ``deadlines`` — :class:`~chunkwatch.watchdog.Deadlines` (first chunk, idle, silent at
  end, abort; ``CHUNKWATCH_*_TIMEOUT``, ``CHUNKWATCH_SILENT_AT_END``,
  ``CHUNKWATCH_ABORT_STALLED``).
* ``capture_content`` — record prompts and completions (truncated); off by default
  (``CHUNKWATCH_CAPTURE_CONTENT``).
* ``translate_errors`` — raise :class:`StreamEmptyError` for empty streams (default on;
  ``CHUNKWATCH_TRANSLATE_ERRORS``).
* ``metrics_path`` — with ``app``, serve Prometheus metrics there (``None``: don't;
  ``CHUNKWATCH_METRICS_PATH``).

A second ``instrument(...)`` (e.g. after the ``opentelemetry_instrumentor`` entry point
instrumented with no arguments) applies the options it is given and logs which changed.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from prometheus_client import CollectorRegistry

from chunkwatch import handoff, probes
from chunkwatch.config import UNSET, Settings
from chunkwatch.patching import patch, unpatch
from chunkwatch.probes.http_in import ENVIRON_KEY, ChunkwatchMiddleware
from chunkwatch.runtime import Runtime, activate, active
from chunkwatch.watchdog import Deadlines

__all__ = ["instrument", "instrument_app", "uninstrument"]

_APP_MARK = "chunkwatch.middleware"
_FLASK_OWNER = "chunkwatch.flask"
_ROUTE_MARK = "chunkwatch.route_hook"  # _note_route registered (it stays: it checks for a ledger)
_lock = threading.RLock()
log = logging.getLogger("chunkwatch")


def instrument(
    app: Any = None,
    *,
    registry: CollectorRegistry | None = UNSET,
    tracer_provider: trace.TracerProvider | None = UNSET,
    upstreams: Mapping[str, str] | None = UNSET,
    deadlines: Deadlines | None = UNSET,
    capture_content: bool = UNSET,
    translate_errors: bool = UNSET,
    metrics_path: str | None = UNSET,
) -> Runtime:
    """Install every probe (idempotent) and, with ``app``, the http/sse probes on it.

    Options not given are read from the environment (:mod:`chunkwatch.config`), then
    default. A later call (after auto-instrumentation, say) applies the options it is
    given to the running instrumentation and logs which changed; none is dropped.
    """
    given = {
        "upstreams": upstreams,
        "deadlines": deadlines,
        "capture_content": capture_content,
        "translate_errors": translate_errors,
        "metrics_path": metrics_path,
    }
    with _lock:
        rt = active()
        if rt is None:
            settings = Settings.from_env().override(**given)
            rt = Runtime(
                registry=None if registry is UNSET else registry,
                tracer_provider=None if tracer_provider is UNSET else tracer_provider,
                settings=settings,
            )
            activate(rt)
            for row in probes.PROBES:
                if row.module is None:
                    continue  # app-level (http, sse, queue): instrument_app, WatchedQueue
                try:
                    importlib.import_module(row.module).instrument(rt)
                    rt.probed.add(row.layer)
                except ImportError:  # the library it hooks is not installed: nothing to watch
                    log.debug("chunkwatch: %s not instrumented", row.module, exc_info=True)
            handoff.instrument()
        elif any(v is not UNSET for v in (*given.values(), registry, tracer_provider)):
            changed = rt.configure(
                rt.settings.override(**given), registry=registry, tracer_provider=tracer_provider
            )
            if changed:
                log.info("chunkwatch: instrument() again: applied %s", ", ".join(changed))
    if app is not None:
        instrument_app(app, rt, metrics_path=rt.settings.metrics_path)
    return rt


def instrument_app(app: Any, rt: Runtime, *, metrics_path: str | None = "/metrics") -> None:
    """The http and sse probes on a Flask app, plus ``/metrics``.

    They run where the WSGI server calls the app (``Flask.__call__``), outside whatever
    wraps ``app.wsgi_app``: OpenTelemetry's Flask and WSGI instrumentations replace and
    restore ``app.wsgi_app`` without regard for others, so chunkwatch never touches it
    — neither tool can strip the other, in any order of instrumenting and removing."""
    rt.serving = True
    middleware = app.extensions.get(_APP_MARK)
    if isinstance(middleware, ChunkwatchMiddleware):
        middleware.enabled = True
        middleware._runtime = rt
    else:
        app.extensions[_APP_MARK] = ChunkwatchMiddleware(
            _CurrentWsgiApp(app), rt, skip_paths=[metrics_path] if metrics_path else []
        )
    # The class that defines __call__ for this app: flask.app.Flask, also when the app is
    # a subclass (OpenTelemetry's auto-instrumentation swaps flask.Flask for one).
    owner = next((c for c in type(app).__mro__ if "__call__" in c.__dict__), None)
    if owner is not None and owner is not object:
        patch(_FLASK_OWNER, owner, "__call__", _make_call)
    if not app.extensions.get(_ROUTE_MARK):  # once per app: Flask refuses hooks after setup
        app.extensions[_ROUTE_MARK] = True
        app.before_request(_note_route)
    if metrics_path and "chunkwatch_metrics" not in app.view_functions:
        app.add_url_rule(metrics_path, "chunkwatch_metrics", _metrics_view())


class _CurrentWsgiApp:
    """Calls the app's ``wsgi_app`` as it is at each request (others may wrap it later)."""

    def __init__(self, app: Any) -> None:
        self.flask_app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        return self.flask_app.wsgi_app(environ, start_response)


def _make_call(original: Any) -> Any:
    def __call__(self: Any, environ: dict[str, Any], start_response: Any) -> Any:
        middleware = self.extensions.get(_APP_MARK)
        if middleware is None or not middleware.enabled:
            return original(self, environ, start_response)
        return middleware(environ, start_response)

    return __call__


def uninstrument(app: Any = None) -> None:
    """Remove every probe; with ``app``, its http/sse probes (``/metrics`` stays).

    Only chunkwatch's own wrappers are taken out: another tool's keeps working."""
    with _lock:
        for row in reversed(probes.PROBES):
            if row.module is not None:
                importlib.import_module(row.module).uninstrument()
        handoff.uninstrument()
        unpatch(_FLASK_OWNER)
        rt = active()
        activate(None)
        if rt is not None:
            rt.close()
    if app is not None:
        middleware = app.extensions.get(_APP_MARK)
        if isinstance(middleware, ChunkwatchMiddleware):
            middleware.enabled = False  # kept, so instrumenting again reuses it
    _forget_instrumentor()


def _forget_instrumentor() -> None:
    """A direct ``uninstrument()`` also resets the OpenTelemetry instrumentor's flag, so
    ``opentelemetry-instrument``-style re-instrumentation is not refused later."""
    try:
        from chunkwatch.instrumentor import ChunkwatchInstrumentor

        ChunkwatchInstrumentor()._is_instrumented_by_opentelemetry = False
    except Exception:  # the instrumentation package's internals moved: nothing to reset
        log.debug("chunkwatch: could not reset the instrumentor's flag", exc_info=True)


def _note_route() -> None:
    from flask import request

    ledger = request.environ.get(ENVIRON_KEY)
    if ledger is None or request.url_rule is None:
        return
    ledger.route = request.url_rule.rule


def _metrics_view() -> Any:
    def metrics() -> Any:
        from flask import Response, request
        from prometheus_client import exposition

        rt = active()
        if rt is None:
            return Response("chunkwatch is not instrumented\n", status=404)
        registry = rt.metrics.registry
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        encoder, content_type = exposition.choose_encoder(request.headers.get("Accept", ""))
        return Response(encoder(registry), content_type=content_type)

    return metrics
