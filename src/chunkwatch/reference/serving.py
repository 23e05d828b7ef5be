"""Serving the reference app: ``chunkwatch serve`` (Werkzeug) and :class:`ServiceThread`.

The gunicorn entry point is :mod:`chunkwatch.reference.wsgi`.
"""

from __future__ import annotations

import argparse
import os
import signal
from dataclasses import replace
from typing import Any

from flask import Flask

import chunkwatch
from chunkwatch.reference.agent import LLMConfig, api_key_from_env
from chunkwatch.reference.service import ServiceConfig, create_app

__all__ = ["ServiceThread", "add_serve_parser", "config_from_args", "run_serve"]


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
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    from werkzeug.serving import make_server

    from chunkwatch import telemetry

    config = config_from_args(args)
    if config.instrument:  # OTEL_* from the environment; None (API no-op) when unconfigured
        config = replace(config, tracer_provider=telemetry.setup_tracing(set_global=True))
    app = create_app(config)
    server = make_server(args.host, args.port, app, threaded=True)
    # SIGTERM (docker stop, systemd, Kubernetes) stops it as SIGINT does: with the flush.
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"chunkwatch serve listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        telemetry.shutdown()
    return 0


class ServiceThread:
    """The app on Werkzeug's threaded server in a daemon thread (demo and tests)."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0) -> None:
        import threading

        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        self.app = app
        self.server = make_server(host, port, app, threaded=True, request_handler=Quiet)
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
