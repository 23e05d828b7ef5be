"""``chunkwatch demo``: the incident, reproduced and explained, on loopback.

Starts the local model endpoint (upstream), the fault-injecting gateway and the
reference service on free loopback ports, then asks the same question twice:
through a healthy gateway, and after switching the gateway to ``zero`` (it
accepts ``stream=true`` and closes without forwarding a chunk). It prints what
the user saw each time.

``--serve``: after the story, keeps the upstream, an upstream-side gateway (service →
gateway → upstream), a fresh reference service and a downstream-side gateway in front of
it (browser → gateway → service) running on loopback, and prints the chat page's URL —
the downstream gateway's, so its faults reach the browser. The page's fault panel switches
either gateway (``/lab/faults``, :mod:`chunkwatch_lab.lab_faults`, on only here). The story
comes first because it says in words what the page then lets a person do by hand; it
takes a few seconds. Both gateways start healthy (``pass``); the service's guard is off
(``--guard`` turns it on), so that a broken stream shows where its data stopped rather
than the fallback's answer. ``--port`` is the page's port (default: a free one). Ctrl-C
(or SIGTERM) stops every part, each within :data:`STOP_BOUND`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
import threading
import time
from typing import Any

import chunkwatch
from chunkwatch_lab.agent import LLMConfig
from chunkwatch_lab.client import ChatResult, chat
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.service import ServiceConfig, create_app
from chunkwatch_lab.serving import ServiceThread
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream

__all__ = ["add_demo_parser", "run_demo"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
QUESTION = "Why did the stream carry no data?"
STOP_BOUND = 5.0  # seconds each part gets to stop; an SSE stream left open does not hold it


def add_demo_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="reproduce the empty-stream incident on loopback")
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--token-delay", type=float, default=0.02)
    p.add_argument(
        "--serve",
        action="store_true",
        help="after the story, keep everything running and serve the chat page, whose panel "
        "switches the gateway fault on either side (Ctrl-C stops)",
    )
    p.add_argument(
        "--port", type=int, default=0, help="--serve: the page's port (default: a free one)"
    )
    p.add_argument(
        "--guard",
        action="store_true",
        help="--serve: the service falls back to state streaming when a stream breaks (off, "
        "so that the page shows where the data stopped)",
    )
    p.set_defaults(func=run_demo)


def describe(result: ChatResult) -> str:
    """One paragraph: what the user saw."""
    if result.status != 200:
        return f"HTTP {result.status}: {result.body.decode(errors='replace')}"
    lines = []
    for switch in result.named("mode"):
        lines.append(f"event: mode   -> {switch['mode']} ({switch['reason']})")
    if result.text:
        lines.append(f"answer: {result.text.strip()!r}")
    error = result.error
    if error:
        lines.append(f"event: error  {error['type']}")
        if "layer" in error:
            lines.append(f"   verdict: {error['outcome']}@{error['layer']}")
            lines.append(f"   {error['detail']}")
        else:
            lines.append(f"   {error['message']}")
    lines.append(
        f"events: {_events(result)}  ({result.elapsed * 1000:.0f} ms, "
        f"{'complete' if result.complete else 'CUT'})"
    )
    return "\n".join(lines)


def _events(result: ChatResult) -> str:
    names = [e.event for e in result.events]
    out: list[str] = []
    for name in names:
        if out and out[-1].startswith(name + " x"):
            n = int(out[-1].split(" x")[1]) + 1
            out[-1] = f"{name} x{n}"
        elif out and out[-1] == name:
            out[-1] = f"{name} x2"
        else:
            out.append(name)
    return ", ".join(out) or "none"


def _metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def run_demo(args: argparse.Namespace) -> int:
    import logging

    if not args.verbose:  # the per-request log lines are for services; here we print
        logging.getLogger("chunkwatch").setLevel(logging.ERROR)
    upstream = start_in_thread(Upstream(tokens=args.tokens, token_delay=args.token_delay))
    gateway = start_in_thread(Gateway(upstream.url))
    names = {gateway.url.removeprefix("http://"): "demo-gateway"}
    config = ServiceConfig(llm=LLMConfig(url=gateway.url), mode="tokens", upstreams=names)
    apps = {
        "bare": ServiceConfig(llm=config.llm, mode="tokens", instrument=False, guard=False),
        "observed": ServiceConfig(llm=config.llm, upstreams=names, guard=False),
        "guarded": ServiceConfig(llm=config.llm, upstreams=names, guard=True),
    }
    try:
        print(f"upstream  {upstream.url}   local OpenAI-compatible model")
        print(f"gateway   {gateway.url}   fault-injecting reverse proxy")
        steps = [
            ("bare", "pass", "1. healthy gateway: the Flask + LangGraph service streams tokens"),
            (
                "bare",
                "zero",
                "2. the gateway breaks (`zero`: 200 text/event-stream, closed with no chunk):\n"
                "   the incident, as the bare service shows it",
            ),
            ("observed", "zero", "3. the same request with chunkwatch: the layer is named"),
            (
                "guarded",
                "zero",
                "4. with the guard: the broken streaming call is re-issued without streaming",
            ),
        ]
        ok = True
        for which, fault, title in steps:
            service = ServiceThread(create_app(apps[which]))
            try:
                gateway.server.set_fault(fault)
                result = chat(service.url, QUESTION, timeout=60)
                print(f"\n{title}\n{textwrap.indent(describe(result), '   ')}")
                ok &= result.done == (fault == "pass" or which == "guarded")
                if which == "guarded":
                    print(_summary(service.url))
            finally:
                service.stop()
        print(
            "\nThe gateway answered 200 and closed the stream without data. Bare, the SDK saw\n"
            "zero chunks and no error, and langchain-core raised `No generations found in\n"
            "stream` three layers up. chunkwatch names the gateway, counts it in\n"
            'chunkwatch_requests_total{outcome="empty",layer="gateway"} (the\n'
            "ChunkwatchEmptyStreams alert), and the guard keeps users served meanwhile."
        )
        if not args.serve:
            print("\nTo break it yourself on the chat page: chunkwatch demo --serve")
            return 0 if ok else 1
        served = serve(upstream.url, gateway, names, port=args.port, guard=args.guard)
        return served if served else (0 if ok else 1)
    finally:
        gateway.stop()
        upstream.stop()


def _summary(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    empty = _metric(text, "chunkwatch_requests_total", outcome="empty", layer="gateway")
    fallbacks = _metric(text, "chunkwatch_fallbacks_total")
    return (
        f'   /metrics: chunkwatch_requests_total{{outcome="empty",layer="gateway"}} '
        f"{empty:g}, chunkwatch_fallbacks_total {fallbacks:g}"
    )


def serve(
    upstream: str, gateway: Running[Gateway], names: dict[str, str], *, port: int, guard: bool
) -> int:
    """The page and both gateways, until SIGINT or SIGTERM; then each part stops in turn.
    Returns 0, or 2 if the page's port cannot be bound."""
    gateway.server.set_fault("pass")  # the story left it broken; the page starts healthy
    stop = threading.Event()
    service: ServiceThread | None = None
    front: Running[Gateway] | None = None
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in _STOP_SIGNALS}
    try:
        try:
            front, service = _front_and_service(gateway.url, names, port=port, guard=guard)
        except OSError as err:
            print(f"chunkwatch demo: cannot serve the page on port {port}: {err}", file=sys.stderr)
            return 2
        print(f"\nupstream  {upstream}   local model")
        print(f"gateway   {gateway.url}   upstream side: service -> gateway -> model")
        print(f"service   {service.url}   reference Flask + LangGraph service")
        print(f"gateway   {front.url}   downstream side: browser -> gateway -> service")
        print(f"\npage: {front.url}/   (switch either gateway's fault on the page)")
        print("Ctrl-C stops everything.", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping…", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        started = time.monotonic()
        if front is not None:
            front.stop(STOP_BOUND)
        if service is not None:
            service.stop()
        print(f"stopped in {time.monotonic() - started:.1f} s", flush=True)
    return 0


def _front_and_service(
    gateway: str, names: dict[str, str], *, port: int, guard: bool
) -> tuple[Running[Gateway], ServiceThread]:
    """The downstream gateway on ``port`` and the service behind it. Each needs the other's
    URL (the gateway forwards to the service; the service's /lab/faults switches the
    gateway), so the service's port is chosen free first and bound second; if another
    process took it meanwhile, again with another."""
    from chunkwatch_lab.serving import Limits

    for attempt in range(3):
        service_port = _free_port()
        front = start_in_thread(
            Gateway(f"http://127.0.0.1:{service_port}", port=port, side="downstream")
        )
        lab = {"upstream": gateway, "downstream": front.url}
        config = ServiceConfig(
            llm=LLMConfig(url=gateway), upstreams=names, guard=guard, lab_gateways=lab
        )
        app = create_app(config)
        try:
            # A short send timeout: a stream the page left unread must not hold Ctrl-C.
            limits = Limits(send_timeout=STOP_BOUND)
            return front, ServiceThread(app, port=service_port, limits=limits)
        except OSError:  # the port was taken meanwhile: undo this attempt, then again
            front.stop(STOP_BOUND)
            app.extensions["chunkwatch.chat"].loop.close()
            chunkwatch.uninstrument(app)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
