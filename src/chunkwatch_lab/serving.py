"""Serving the reference app: ``chunkwatch serve`` (Werkzeug) and :class:`ServiceThread`.

Both run on :class:`~chunkwatch_lab._bounded.BoundedServer`, Werkzeug's
server with bounds: requests are read without a thread and within a deadline,
at most ``--threads`` are served at once, and every error the server sends
itself is JSON. The options and their defaults (``chunkwatch serve --help``):

* ``--threads`` (64) — requests served at once; each open SSE stream holds one.
  Past it: ``503`` with ``Retry-After: 1``.
* ``--max-pending`` (256) — connections still sending their request. Past it, the
  one that has been sending longest is answered ``408`` and closed.
* ``--read-timeout`` (10 s) — to send the whole request (line, headers, body),
  from the connection. Past it: ``408``. A streamed answer is not timed: it lasts
  as long as the agent (``--request-timeout``).
* ``--send-timeout`` (60 s) — a client that reads nothing of its answer for this
  long is disconnected.
* ``--max-request-line`` (8190 bytes, else ``414``), ``--max-header-bytes`` (32768,
  line and headers together, else ``431``), ``--max-header-fields`` (100, else
  ``431``); the body: 64 KiB (the app's ``413``).

The gunicorn entry point is :mod:`chunkwatch_lab.wsgi`; docs/deployment.md
compares the two and shows the proxy to put in front of either.
"""

from __future__ import annotations

import argparse
import os
import signal
from dataclasses import replace
from typing import Any

from flask import Flask

import chunkwatch
from chunkwatch_lab._bounded import BoundedServer, QuietHandler
from chunkwatch_lab._limits import Limits
from chunkwatch_lab.agent import LLMConfig, api_key_from_env
from chunkwatch_lab.service import ServiceConfig, create_app

__all__ = [
    "Limits",
    "ServiceThread",
    "add_serve_parser",
    "config_from_args",
    "limits_from_args",
    "run_serve",
]


# -- CLI ----------------------------------------------------------------------------------------


def add_serve_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the reference Flask + LangGraph service")
    p.add_argument("--llm-url", required=True, help="base URL of the model endpoint (the gateway)")
    p.add_argument("--deployment", default="gpt-4o-mini")
    p.add_argument("--api-version", default="2024-10-21")
    p.add_argument("--mode", choices=("tokens", "updates"), default="tokens")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--heartbeat", type=float, default=15.0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    d = Limits()
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help=f"requests served at once, open streams included (default {d.threads}); "
        "past it: JSON 503",
    )
    p.add_argument(
        "--max-pending",
        type=int,
        default=d.max_pending,
        help=f"connections still sending their request (default {d.max_pending}); past it "
        "the oldest gets JSON 408",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=d.read_timeout,
        help=f"seconds to send the whole request, body included (default {d.read_timeout:g}); "
        "past it: JSON 408. Streamed answers are not timed",
    )
    p.add_argument(
        "--send-timeout",
        type=float,
        default=d.send_timeout,
        help=f"seconds a client may read nothing of its answer (default {d.send_timeout:g})",
    )
    p.add_argument("--max-request-line", type=int, default=d.max_request_line, help="bytes; 414")
    p.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes, help="bytes; 431")
    p.add_argument("--max-header-fields", type=int, default=d.max_header_fields, help="431")
    p.add_argument(
        "--no-instrument", dest="instrument", action="store_false", help="run without chunkwatch"
    )
    p.add_argument(
        "--no-guard",
        dest="guard",
        action="store_false",
        default=os.environ.get("CHUNKWATCH_GUARD", "1") not in ("0", "false", ""),
        help="do not fall back to state streaming when token streaming breaks",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics on this port instead of the app's (default: the app's port)",
    )
    p.add_argument(
        "--metrics-host", default="127.0.0.1", help="address of --metrics-port (127.0.0.1)"
    )
    p.set_defaults(func=run_serve)


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    return ServiceConfig(
        llm=LLMConfig(
            url=args.llm_url,
            deployment=args.deployment,
            api_version=args.api_version,
            api_key=api_key_from_env(),
        ),
        mode=args.mode,
        heartbeat=args.heartbeat,
        request_timeout=args.request_timeout,
        instrument=args.instrument,
        guard=args.guard,
        serve_metrics=args.metrics_port is None,
    )


def limits_from_args(args: argparse.Namespace) -> Limits:
    limits = Limits(
        threads=args.threads,
        max_pending=args.max_pending,
        read_timeout=args.read_timeout,
        send_timeout=args.send_timeout,
        max_request_line=args.max_request_line,
        max_header_bytes=args.max_header_bytes,
        max_header_fields=args.max_header_fields,
    )
    for name in ("threads", "max_pending", "read_timeout", "send_timeout"):
        if getattr(limits, name) <= 0:
            raise SystemExit(f"chunkwatch serve: --{name.replace('_', '-')} must be above 0")
    return limits


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    from chunkwatch_lab import telemetry

    limits = limits_from_args(args)
    config = config_from_args(args)
    if config.instrument:  # OTEL_* from the environment; None (API no-op) when unconfigured
        config = replace(config, tracer_provider=telemetry.setup_tracing(set_global=True))
    app = create_app(config)
    server = BoundedServer(args.host, args.port, app, limits)
    # SIGTERM (docker stop, systemd, Kubernetes) stops it as SIGINT does: with the flush.
    # SIGINT explicitly too, as gunicorn does: a process started in the background by a
    # non-interactive shell (a CI script's `cmd &`, nohup) inherits SIGINT ignored, and a
    # server must still stop on it (docker stop --signal SIGINT, a supervisor).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    print(f"chunkwatch serve listening on http://{args.host}:{server.server_port}", flush=True)
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        metrics, _ = start_http_server(args.metrics_port, addr=args.metrics_host)
        print(
            f"chunkwatch serve metrics on http://{args.metrics_host}:{metrics.server_port}/metrics",
            flush=True,
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        telemetry.shutdown()
    return 0


class ServiceThread:
    """The app on the bounded server of ``chunkwatch serve``, in a daemon thread (demo, tests)."""

    def __init__(
        self, app: Flask, host: str = "127.0.0.1", port: int = 0, limits: Limits | None = None
    ) -> None:
        import threading

        self.app = app
        self.server = BoundedServer(host, port, app, limits, handler=QuietHandler)
        self.url = f"http://{host}:{self.server.server_port}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="chunkwatch-service", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and stop the agent loop. Idempotent."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
        chat = self.app.extensions.get("chunkwatch.chat")
        if chat is not None:
            chat.loop.close()
            if chat.config.instrument:
                chunkwatch.uninstrument(self.app)
