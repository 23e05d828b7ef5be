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
* ``beacon_path`` — with ``app``, the browser beacon endpoint there, and a stream token
  on every SSE response (``None``: neither; ``CHUNKWATCH_BEACON_PATH``; :mod:`chunkwatch.browser`).
* ``agent_name`` — the ``invoke_agent`` span's ``gen_ai.agent.name`` (``None``: the run's
  ``run_name``, else the graph's name; ``CHUNKWATCH_AGENT_NAME``).

A second ``instrument(...)`` (e.g. after the ``opentelemetry_instrumentor`` entry point
instrumented with no arguments) applies the options it is given and logs which changed.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from prometheus_client import CollectorRegistry

from chunkwatch import handoff, probes
from chunkwatch.config import UNSET, Settings
from chunkwatch.integrations import flask as flask_integration
from chunkwatch.runtime import Runtime, activate, active
from chunkwatch.watchdog import Deadlines

__all__ = ["instrument", "uninstrument"]

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
    beacon_path: str | None = UNSET,
    agent_name: str | None = UNSET,
) -> Runtime:
    """Install every probe (idempotent) and, with ``app`` (a Flask app), the http/sse
    probes on it (:mod:`chunkwatch.integrations.flask`).

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
        "beacon_path": beacon_path,
        "agent_name": agent_name,
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
                    continue  # app-level (http, sse, queue): integrations.flask, WatchedQueue
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
        flask_integration.instrument_app(
            app, rt, metrics_path=rt.settings.metrics_path, beacon_path=rt.settings.beacon_path
        )
    return rt


def uninstrument(app: Any = None) -> None:
    """Remove every probe; with ``app``, its http/sse probes (``/metrics`` stays).

    Only chunkwatch's own wrappers are taken out: another tool's keeps working."""
    with _lock:
        for row in reversed(probes.PROBES):
            if row.module is not None:
                importlib.import_module(row.module).uninstrument()
        handoff.uninstrument()
        flask_integration.uninstrument_app(app)
        rt = active()
        activate(None)
        if rt is not None:
            rt.close()
    _forget_instrumentor()


def _forget_instrumentor() -> None:
    """A direct ``uninstrument()`` also resets the OpenTelemetry instrumentor's flag, so
    ``opentelemetry-instrument``-style re-instrumentation is not refused later."""
    try:
        from chunkwatch.integrations.opentelemetry import ChunkwatchInstrumentor

        ChunkwatchInstrumentor()._is_instrumented_by_opentelemetry = False
    except Exception:  # the instrumentation package's internals moved: nothing to reset
        log.debug("chunkwatch: could not reset the instrumentor's flag", exc_info=True)
