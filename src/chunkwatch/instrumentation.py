"""``chunkwatch.instrument(...)``: every probe at once, and its inverse.

Usage (an existing Flask + LangGraph service)::

    import chunkwatch

    app = Flask(__name__)
    chunkwatch.instrument(app, upstreams={"my-gateway.example.com": "azure-gw"})

    @app.post("/chat")
    def chat():
        ledger = chunkwatch.request_ledger()          # this request's ledger
        items = chunkwatch.WatchedQueue(ledger)       # instead of queue.Queue()
        loop_submit(run_agent(..., ledger, items))  # agent: `with chunkwatch.bind(ledger):`
        ...

Configuration (arguments; the environment variables are read by
:meth:`Deadlines.from_env` and :func:`chunkwatch.telemetry.setup_tracing`):

* ``registry`` — the Prometheus registry (default: the global one).
* ``tracer_provider`` — default: the global one.
* ``upstreams`` — ``{host | host:port | URL prefix: name}`` for the ``upstream`` label.
* ``deadlines`` — :class:`~chunkwatch.watchdog.Deadlines` (first chunk, idle, abort).
* ``capture_content`` — record prompts and completions (truncated); off by default.
* ``translate_errors`` — raise :class:`StreamEmptyError` for empty streams (default on).
* ``metrics_path`` — with ``app``, serve Prometheus metrics there (``None``: don't).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from prometheus_client import CollectorRegistry

from chunkwatch import semconv as sc
from chunkwatch.probes import gateway, langgraph, sdk
from chunkwatch.probes.http_in import ENVIRON_KEY, ChunkwatchMiddleware
from chunkwatch.runtime import Runtime, activate, active
from chunkwatch.watchdog import Deadlines

__all__ = ["instrument", "instrument_app", "uninstrument"]

_APP_MARK = "chunkwatch.middleware"


def instrument(
    app: Any = None,
    *,
    registry: CollectorRegistry | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    upstreams: Mapping[str, str] | None = None,
    deadlines: Deadlines | None = None,
    capture_content: bool = False,
    translate_errors: bool = True,
    metrics_path: str | None = "/metrics",
) -> Runtime:
    """Install every probe (idempotent) and, with ``app``, the http/sse probes on it.

    A second call returns the runtime of the first; call :func:`uninstrument` to
    change the configuration.
    """
    rt = active()
    if rt is None:
        rt = Runtime(
            registry=registry,
            tracer_provider=tracer_provider,
            upstreams=upstreams,
            deadlines=deadlines,
            capture_content=capture_content,
            translate_errors=translate_errors,
        )
        activate(rt)
        gateway.instrument(rt)
        sdk.instrument(rt)
        langgraph.instrument(rt)
    if app is not None:
        instrument_app(app, rt, metrics_path=metrics_path)
    return rt


def instrument_app(app: Any, rt: Runtime, *, metrics_path: str | None = "/metrics") -> None:
    """The http and sse probes on a Flask app (its ``wsgi_app``), plus ``/metrics``."""
    if app.extensions.get(_APP_MARK) is not None:
        return
    original = app.wsgi_app
    skip = [metrics_path] if metrics_path else []
    app.wsgi_app = ChunkwatchMiddleware(original, rt, skip_paths=skip)
    app.extensions[_APP_MARK] = original
    app.before_request(_note_route)
    if metrics_path:
        app.add_url_rule(metrics_path, "chunkwatch_metrics", _metrics_view(rt))


def uninstrument(app: Any = None) -> None:
    """Remove every probe; with ``app``, restore its ``wsgi_app`` (``/metrics`` stays)."""
    gateway.uninstrument()
    sdk.uninstrument()
    langgraph.uninstrument()
    rt = active()
    activate(None)
    if rt is not None:
        rt.close()
    if app is not None:
        original = app.extensions.pop(_APP_MARK, None)
        if original is not None:
            app.wsgi_app = original


def _note_route() -> None:
    from flask import request

    ledger = request.environ.get(ENVIRON_KEY)
    if ledger is None or request.url_rule is None:
        return
    for tally in ledger.layer(sc.HTTP):
        tally.facts["route"] = request.url_rule.rule


def _metrics_view(rt: Runtime) -> Any:
    def metrics() -> Any:
        from flask import Response, request
        from prometheus_client import exposition

        registry = rt.metrics.registry
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        encoder, content_type = exposition.choose_encoder(request.headers.get("Accept", ""))
        return Response(encoder(registry), content_type=content_type)

    return metrics
