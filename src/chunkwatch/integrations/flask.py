"""The http and sse probes on a Flask app, and Prometheus metrics at ``/metrics``.

Usage: ``chunkwatch.instrument(app)`` calls :func:`instrument_app` and
``chunkwatch.uninstrument(app)`` calls :func:`uninstrument_app`; call them directly only
to wire an app to a :class:`~chunkwatch.runtime.Runtime` you hold.

The probes run where the WSGI server calls the app (``Flask.__call__``), outside whatever
wraps ``app.wsgi_app``: OpenTelemetry's Flask and WSGI instrumentations replace and
restore ``app.wsgi_app`` without regard for others, so chunkwatch never touches it —
neither tool can strip the other, in any order of instrumenting and removing.

Flask itself is imported only inside a request, so the library imports this module
without it (``pip install 'chunkwatch[flask]'`` brings it).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry

from chunkwatch.browser import Beacons
from chunkwatch.patching import patch, unpatch
from chunkwatch.probes.http_in import ENVIRON_KEY, ChunkwatchMiddleware, flask_module
from chunkwatch.runtime import Runtime, active

__all__ = ["instrument_app", "uninstrument_app"]

# app.extensions keys: bench/serve_toggle.py reads _APP_MARK's value
_APP_MARK = "chunkwatch.middleware"
_ROUTE_MARK = "chunkwatch.route_hook"  # _note_route registered (it stays: it checks for a ledger)
_OWNER = "chunkwatch.flask"  # the patching owner of Flask.__call__


def instrument_app(
    app: Any,
    rt: Runtime,
    *,
    metrics_path: str | None = "/metrics",
    beacon_path: str | None = "/chunkwatch/beacon",
) -> None:
    """The http and sse probes on ``app`` (idempotent), plus ``metrics_path`` and the
    browser beacon endpoint at ``beacon_path`` (:mod:`chunkwatch.browser`) if given."""
    rt.serving = True
    middleware = app.extensions.get(_APP_MARK)
    if isinstance(middleware, ChunkwatchMiddleware):
        middleware.enabled = True
        middleware._runtime = rt
    else:
        middleware = app.extensions[_APP_MARK] = ChunkwatchMiddleware(
            _CurrentWsgiApp(app), rt, skip_paths=[metrics_path] if metrics_path else []
        )
    # The endpoint is answered by the middleware itself (it is no request of the app's):
    # kept across instrument calls with the same path, so its tokens stay valid.
    if not beacon_path:
        middleware.beacons = None
    elif middleware.beacons is None or middleware.beacons.path != beacon_path.rstrip("/"):
        middleware.beacons = Beacons(beacon_path)
    # The class that defines __call__ for this app: flask.app.Flask, also when the app is
    # a subclass (OpenTelemetry's auto-instrumentation swaps flask.Flask for one).
    owner = next((c for c in type(app).__mro__ if "__call__" in c.__dict__), None)
    if owner is not None and owner is not object:
        patch(_OWNER, owner, "__call__", _make_call)
    if not app.extensions.get(_ROUTE_MARK):  # once per app: Flask refuses hooks after setup
        app.extensions[_ROUTE_MARK] = True
        app.before_request(_note_route)
    if metrics_path and "chunkwatch_metrics" not in app.view_functions:
        app.add_url_rule(metrics_path, "chunkwatch_metrics", _metrics_view())


def uninstrument_app(app: Any = None) -> None:
    """Take chunkwatch out of ``Flask.__call__``; with ``app``, switch its probes off.

    ``/metrics`` and the route hook stay (Flask refuses to remove either); the middleware
    is kept, disabled, so instrumenting again reuses it."""
    unpatch(_OWNER)
    if app is not None:
        middleware = app.extensions.get(_APP_MARK)
        if isinstance(middleware, ChunkwatchMiddleware):
            middleware.enabled = False


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


def _note_route() -> None:
    request = flask_module().request
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
