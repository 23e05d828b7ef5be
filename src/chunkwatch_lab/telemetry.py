"""The OpenTelemetry SDK set-up for chunkwatch's own processes: the service and the CLI.

The library itself uses the OpenTelemetry API only (it takes a
``tracer_provider``, default the global one); this module is the one place that
builds an SDK ``TracerProvider``, from the standard ``OTEL_*`` environment
variables, so that ``chunkwatch serve`` and the gunicorn entry point
(:mod:`chunkwatch_lab.wsgi`) export traces the way every other
OpenTelemetry-instrumented process does.

Usage::

    from chunkwatch_lab import telemetry

    provider = telemetry.setup_tracing("my-service", set_global=True)  # None: tracing is off
    ...
    telemetry.shutdown()  # at exit: flush what is still batched (5 s at most), stop the exporter

Configuration (environment variables):

* ``OTEL_SDK_DISABLED`` — ``true``: no provider at all (``setup_tracing`` returns None).
* ``OTEL_TRACES_EXPORTER`` — comma-separated: ``otlp`` (OTLP/HTTP protobuf),
  ``console`` (JSON spans on stdout), ``none``. Unset: ``otlp`` if an OTLP
  endpoint variable (below) is set, else nothing — an unconfigured process never
  sends spans to a default address. Set to ``otlp`` explicitly, the exporter
  uses its default ``http://localhost:4318`` when no endpoint is set (a
  collector sidecar). Unknown names are logged and ignored. With no exporter,
  tracing is off and ``setup_tracing`` returns None.
* ``OTEL_EXPORTER_OTLP_ENDPOINT`` — base URL; spans go to ``{base}/v1/traces``.
* ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` — the full traces URL (wins over the above).
* ``OTEL_EXPORTER_OTLP_HEADERS`` / ``OTEL_EXPORTER_OTLP_TRACES_HEADERS`` —
  ``key=value,...`` sent with every export (e.g. an auth token).
* ``OTEL_EXPORTER_OTLP_TIMEOUT``, ``..._COMPRESSION``, ``..._CERTIFICATE``,
  ``..._CLIENT_KEY``, ``..._CLIENT_CERTIFICATE`` (and their ``_TRACES_``
  forms) — read by the OTLP exporter itself.
* ``OTEL_SERVICE_NAME`` — ``service.name`` (default: the ``service_name`` argument).
* ``OTEL_RESOURCE_ATTRIBUTES`` — ``key=value,...`` resource attributes
  (``service.name`` there also wins over the argument).
* ``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG`` — the sampler (default
  ``parentbased_always_on``). chunkwatch's exemplars carry the trace id of
  sampled traces only.
* ``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_BSP_MAX_QUEUE_SIZE``,
  ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``, ``OTEL_BSP_EXPORT_TIMEOUT`` — the batch
  span processor.
* ``OTEL_PROPAGATORS`` — read by the API: how ``traceparent`` is read from and
  written to requests (default W3C trace context and baggage).

Shutdown is bounded: :func:`shutdown` (also run at interpreter exit) gives the
flush and the exporter's shutdown 5 s in all, whatever the endpoint does. The
SDK's own flush ignores its timeout and waits for the export in progress, and an
OTLP export to an endpoint that never answers, or a closed port, takes up to
``OTEL_EXPORTER_OTLP_TIMEOUT`` (10 s by default) per batch, retries included; so
the flush runs in a daemon thread and is abandoned at the deadline, with one
warning that the spans still batched are lost. The process exits on time; the
export that was in progress dies with it.

Forks: the SDK's batch processor restarts its export thread in a forked child,
so a provider built before a fork keeps working after it; the gunicorn entry
point builds it in each worker anyway.

API: :func:`setup_tracing`, :func:`shutdown`.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

__all__ = ["setup_tracing", "shutdown"]

log = logging.getLogger("chunkwatch")

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
EXPORTERS = ("otlp", "console", "none")
FLUSH_TIMEOUT_MS = 5000

_providers: list[TracerProvider] = []
_lock = threading.Lock()
_at_exit = False


def _exporter_names() -> list[str]:
    raw = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        return ["otlp"] if any(os.environ.get(v) for v in ENDPOINT_VARS) else []
    names = [n.strip() for n in raw.split(",") if n.strip()]
    for name in names:
        if name not in EXPORTERS:
            log.warning(
                "chunkwatch: OTEL_TRACES_EXPORTER=%s: unknown exporter %r ignored "
                "(supported: otlp, console, none)",
                raw,
                name,
            )
    return [n for n in names if n in ("otlp", "console")]


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout, TLS: from OTEL_EXPORTER_OTLP_*


def _resource(service_name: str) -> Resource:
    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    if not named:
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    return resource


def setup_tracing(
    service_name: str = "chunkwatch", *, set_global: bool = False
) -> TracerProvider | None:
    """A ``TracerProvider`` configured from ``OTEL_*`` (see the module doc), or None if off.

    ``set_global``: also make it the global provider (once per process; the
    OpenTelemetry API ignores a second one, with a warning).
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = _exporter_names()
    if not names:
        return None
    # sampler: OTEL_TRACES_SAMPLER. Not the SDK's own exit hook: its flush has no deadline.
    provider = TracerProvider(resource=_resource(service_name), shutdown_on_exit=False)
    for name in dict.fromkeys(names):
        exporter = _exporter(name)
        if name == "console":
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    global _at_exit
    with _lock:
        _providers.append(provider)
        if not _at_exit:
            atexit.register(shutdown)
            _at_exit = True
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def shutdown(timeout_millis: int = FLUSH_TIMEOUT_MS) -> bool:
    """Flush and shut down every provider :func:`setup_tracing` built, within ``timeout_millis``.

    Returns False if the deadline came first: the flush goes on in a daemon thread
    that does not hold up the process's exit, and the spans it had not sent are
    lost (logged once, as a warning). Idempotent; also registered with ``atexit``.
    """
    with _lock:
        providers = _providers[:]
        _providers.clear()
    if not providers:
        return True
    done = threading.Event()

    def flush_and_stop() -> None:
        for provider in providers:
            try:
                provider.force_flush(timeout_millis)
                provider.shutdown()
            except Exception:
                log.debug("chunkwatch: shutting down a tracer provider failed", exc_info=True)
        done.set()

    threading.Thread(target=flush_and_stop, name="chunkwatch-trace-flush", daemon=True).start()
    if done.wait(timeout_millis / 1000):
        return True
    log.warning(
        "chunkwatch: the trace exporter did not finish within %.1f s at shutdown (is the "
        "OTLP endpoint %s answering?): giving up, the spans still batched are lost",
        timeout_millis / 1000,
        _endpoint(),
    )
    return False


def _endpoint() -> str:
    """Where the OTLP exporter sends, as scheme://host:port (no credentials, no path)."""
    url = next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), "")
    parts = urlsplit(url or "http://localhost:4318")
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
