"""The reference service under gunicorn: the WSGI entry point and its gunicorn hooks.

Usage (this module is both the app and the gunicorn config; see ``docs/deployment.md``)::

    export CHUNKWATCH_LLM_URL=http://127.0.0.1:8081
    export PROMETHEUS_MULTIPROC_DIR=/run/chunkwatch/metrics   # empty, before start
    gunicorn -c python:chunkwatch_lab.wsgi -w 4 -b 127.0.0.1:8000  # behind a proxy

``-c python:chunkwatch_lab.wsgi`` loads the hooks below and the defaults
``worker_class = "gthread"``, ``threads = 8`` and ``wsgi_app`` (this module's
``app``). ``gunicorn chunkwatch_lab.wsgi:app`` alone serves the app but
without the hooks: with several workers, use the config.

Configuration (environment variables; read at import, so a missing or bad value
stops gunicorn at start, not at the first request):

* ``CHUNKWATCH_LLM_URL`` — required: base URL of the model endpoint (usually the
  gateway; ``azure_endpoint``).
* ``CHUNKWATCH_MODE`` — ``tokens`` (default) or ``updates``.
* ``CHUNKWATCH_DEPLOYMENT`` — Azure deployment name (default ``gpt-4o-mini``).
* ``CHUNKWATCH_API_VERSION`` — Azure ``api-version`` (default ``2024-10-21``).
* ``AZURE_OPENAI_API_KEY`` or ``OPENAI_API_KEY`` — the model endpoint's key; or
  ``CHUNKWATCH_API_KEY_FILE``, a file holding it (a mounted secret). Never logged.
* ``CHUNKWATCH_INSTRUMENT`` — ``1`` (default) or ``0``: run without chunkwatch.
* ``CHUNKWATCH_GUARD`` — ``1`` (default) or ``0``: as ``chunkwatch serve --no-guard``
  (the fallback to state streaming when token streaming breaks; its breaker is
  per worker process).
* ``CHUNKWATCH_HEARTBEAT``, ``CHUNKWATCH_REQUEST_TIMEOUT`` — seconds, as
  ``chunkwatch serve --heartbeat`` / ``--request-timeout``.
* ``CHUNKWATCH_MAX_CONVERSATIONS``, ``CHUNKWATCH_CONVERSATION_TTL``,
  ``CHUNKWATCH_HISTORY_MESSAGES``, ``CHUNKWATCH_HISTORY_CHARS`` — conversation memory
  (per worker process; :mod:`chunkwatch_lab.conversations`, docs/service.md).
* ``CHUNKWATCH_BODY_TIMEOUT`` — seconds a client has to send its request body
  (default 10, as ``chunkwatch serve --read-timeout``); past it: JSON 408 and the
  connection closed (:class:`~chunkwatch_lab._limits.BodyDeadline`).
* ``CHUNKWATCH_FIRST_CHUNK_TIMEOUT``, ``CHUNKWATCH_IDLE_TIMEOUT`` — the stall
  deadlines (:meth:`chunkwatch.Deadlines.from_env`; stalled upstream streams
  are aborted, as in ``chunkwatch serve``).
* ``CHUNKWATCH_METRICS_PORT`` (and ``CHUNKWATCH_METRICS_HOST``, default 127.0.0.1) —
  serve ``/metrics`` on that port from the master (every worker summed; needs
  ``PROMETHEUS_MULTIPROC_DIR``) instead of on the app's port, so the clients' network
  never reaches it.
* ``PROMETHEUS_MULTIPROC_DIR`` — with several workers: prometheus_client's
  multiprocess mode (must be set before gunicorn starts; an empty directory).
* ``OTEL_*`` — traces, see :mod:`chunkwatch_lab.telemetry`.

Why the app is built lazily: the service runs every agent on one background
event loop thread (:class:`~chunkwatch_lab.loop.AgentLoop`). A thread
started in gunicorn's master does not exist in the workers forked from it:
tasks submitted to its loop never run and every ``/chat`` would send nothing
but heartbeats. gunicorn imports this module in the master (``-c python:...``,
``--preload``), so ``app`` is a :class:`LazyApp` that builds the Flask app, the
loop, the metrics and the tracer provider in each worker, after the fork
(``post_worker_init``), and refuses to run an app built in another process.

Limits: the request line (8190 bytes), header fields (100, 8190 bytes each) and
the body (64 KiB, read within ``CHUNKWATCH_BODY_TIMEOUT``) are bounded here. What
gunicorn cannot bound — a client sending its *headers* slowly holds a worker
thread for as long as it keeps sending, a slow body holds one until the body
deadline, and gunicorn's own 400/414/431 pages are plain text — is the job of a
buffering proxy in front: docs/deployment.md has the nginx configuration.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import chunkwatch
from chunkwatch_lab import telemetry
from chunkwatch_lab._limits import BodyDeadline, Limits
from chunkwatch_lab.agent import LLMConfig, api_key_from_env
from chunkwatch_lab.service import ServiceConfig, create_app

__all__ = [
    "LazyApp",
    "app",
    "body_timeout_from_env",
    "child_exit",
    "config_from_env",
    "on_starting",
    "post_worker_init",
    "worker_exit",
]

log = logging.getLogger("chunkwatch.service")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def body_timeout_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """``CHUNKWATCH_BODY_TIMEOUT``: seconds to send the request body. Raises ValueError."""
    timeout = _seconds(environ, "CHUNKWATCH_BODY_TIMEOUT", Limits.read_timeout)
    if timeout <= 0:
        raise ValueError(f"CHUNKWATCH_BODY_TIMEOUT={timeout:g}: expected seconds above 0")
    return timeout


def config_from_env(environ: Mapping[str, str] = os.environ) -> ServiceConfig:
    """The :class:`ServiceConfig` the ``CHUNKWATCH_*`` variables describe. Raises ValueError."""
    url = environ.get("CHUNKWATCH_LLM_URL", "").strip()
    if not url:
        raise ValueError(
            "CHUNKWATCH_LLM_URL is not set: it is the base URL of the model endpoint "
            "(usually the gateway), e.g. CHUNKWATCH_LLM_URL=http://127.0.0.1:8081"
        )
    mode = environ.get("CHUNKWATCH_MODE", "tokens").strip() or "tokens"
    if mode not in ("tokens", "updates"):
        raise ValueError(f"CHUNKWATCH_MODE={mode!r}: expected 'tokens' or 'updates'")
    instrument = _flag(environ, "CHUNKWATCH_INSTRUMENT")
    guard = _flag(environ, "CHUNKWATCH_GUARD")
    llm = LLMConfig(
        url=url,
        deployment=environ.get("CHUNKWATCH_DEPLOYMENT", "").strip() or LLMConfig.deployment,
        api_version=environ.get("CHUNKWATCH_API_VERSION", "").strip() or LLMConfig.api_version,
        api_key=api_key_from_env(environ),
    )
    return ServiceConfig(
        llm=llm,
        mode=mode,  # type: ignore[arg-type]  # checked above
        heartbeat=_seconds(environ, "CHUNKWATCH_HEARTBEAT", ServiceConfig.heartbeat),
        request_timeout=_seconds(
            environ, "CHUNKWATCH_REQUEST_TIMEOUT", ServiceConfig.request_timeout
        ),
        instrument=instrument,
        guard=guard,
        serve_metrics=metrics_port_from_env(environ) is None,
    )


def metrics_port_from_env(environ: Mapping[str, str] = os.environ) -> int | None:
    """``CHUNKWATCH_METRICS_PORT``: serve ``/metrics`` there (from the master, summing
    every worker) instead of on the app's port. Raises ValueError."""
    raw = environ.get("CHUNKWATCH_METRICS_PORT", "").strip()
    if not raw:
        return None
    if not raw.isdecimal() or not 0 < int(raw) < 65536:
        raise ValueError(f"CHUNKWATCH_METRICS_PORT={raw!r}: expected a port number")
    return int(raw)


def _flag(environ: Mapping[str, str], name: str, default: bool = True) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in _TRUE + _FALSE:
        raise ValueError(f"{name}={raw!r}: expected 1 or 0")
    return raw in _TRUE


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds") from None


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class LazyApp:
    """A WSGI app that builds the reference service in the process that serves it.

    :meth:`load` builds it (the ``post_worker_init`` hook calls it in each
    worker); the first request does, if nothing did. An app built in another
    process (before a fork) is refused with an error, never served half-dead.
    """

    def __init__(self, config: ServiceConfig, body_timeout: float = Limits.read_timeout) -> None:
        self.config = config
        self.body_timeout = body_timeout
        self._lock = threading.Lock()
        self._flask: Any = None
        self._served: WSGIApp | None = None  # the Flask app behind the body deadline
        self._pid: int | None = None

    def load(self) -> WSGIApp:
        """The Flask app of this process, built on first use (with tracing, if configured)."""
        with self._lock:
            if self._flask is not None:
                if self._pid != os.getpid():
                    raise RuntimeError(
                        f"chunkwatch: the app was built in process {self._pid} and this is "
                        f"process {os.getpid()}, forked from it: its agent loop thread does "
                        "not exist here. Build it in each worker (the post_worker_init hook "
                        "of chunkwatch_lab.wsgi); see docs/deployment.md"
                    )
                flask_app: WSGIApp = self._flask
                return flask_app
            config = self.config
            if config.instrument:
                provider = telemetry.setup_tracing("chunkwatch", set_global=True)
                config = replace(config, tracer_provider=provider)
            self._flask = create_app(config)
            self._served = BodyDeadline(self._flask, self.body_timeout)
            self._pid = os.getpid()
            built: WSGIApp = self._flask
            return built

    def close(self) -> None:
        """Stop the agent loop, remove the probes and flush traces. Idempotent."""
        with self._lock:
            flask_app, self._flask, self._served = self._flask, None, None
        if flask_app is None or self._pid != os.getpid():
            return
        chat = flask_app.extensions.get("chunkwatch.chat")
        if chat is not None:
            chat.loop.close()
        if self.config.instrument:
            chunkwatch.uninstrument(flask_app)
            telemetry.shutdown()

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        served = self._served
        if served is None or self._pid != os.getpid():
            self.load()  # first use in this process, or the refusal
            served = self._served
            assert served is not None
        return served(environ, start_response)


app = LazyApp(config_from_env(), body_timeout_from_env())


# -- gunicorn configuration (``gunicorn -c python:chunkwatch_lab.wsgi``) --------------------
# Module-level names that are gunicorn settings are read as settings: keep the others distinct.

wsgi_app = "chunkwatch_lab.wsgi:app"
worker_class = "gthread"  # a stream holds a thread; sync workers would be killed at --timeout
threads = 8
# What a request may hold (docs/deployment.md, "Limits"); gunicorn answers 400, 414 or 431
# past them, as plain text. Keep-alive connections wait on the worker's poller, not a thread.
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190


def on_starting(server: Any) -> None:
    """Master, before the workers: check ``PROMETHEUS_MULTIPROC_DIR`` and, with
    ``CHUNKWATCH_METRICS_PORT``, serve the workers' summed metrics on that port."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    port = metrics_port_from_env()
    if port is not None:
        if not path:
            raise RuntimeError(
                "CHUNKWATCH_METRICS_PORT needs PROMETHEUS_MULTIPROC_DIR: the master serves "
                "the metrics the workers write there"
            )
        _serve_metrics(server, port, os.environ.get("CHUNKWATCH_METRICS_HOST") or "127.0.0.1")
    if not path:
        return
    if not os.path.isdir(path):
        raise RuntimeError(f"PROMETHEUS_MULTIPROC_DIR={path} is not a directory: create it")
    stale = glob.glob(os.path.join(path, "*.db"))
    if stale:
        server.log.warning(
            "PROMETHEUS_MULTIPROC_DIR=%s holds %d metric file(s) of an earlier run: their "
            "values are added to this run's (empty the directory before starting)",
            path,
            len(stale),
        )


def _serve_metrics(server: Any, port: int, host: str) -> None:
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    httpd, _ = start_http_server(port, addr=host, registry=registry)
    # The workers are forked from here: they must not keep the metrics socket open.
    os.set_inheritable(httpd.socket.fileno(), False)
    server.log.info("chunkwatch: metrics on http://%s:%d/metrics", host, httpd.server_port)


def post_worker_init(worker: Any) -> None:
    """Worker, after the fork: build the app here, so its loop thread lives in this process."""
    app.load()
    worker.log.info("chunkwatch: app ready in worker %s", os.getpid())


def worker_exit(server: Any, worker: Any) -> None:
    """Worker, on its way out: stop the agent loop and flush the spans still batched."""
    app.close()


def child_exit(server: Any, worker: Any) -> None:
    """Master, when a worker has exited: drop its live gauges (``chunkwatch_streams_open``)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
