"""``chunkwatch demo``: the incident, reproduced and explained, on loopback.

Starts the local model endpoint (upstream), the fault-injecting gateway and the
reference service on free loopback ports, then asks the same question twice:
through a healthy gateway, and after switching the gateway to ``zero`` (it
accepts ``stream=true`` and closes without forwarding a chunk). It prints what
the user saw each time.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from chunkwatch.reference.agent import LLMConfig
from chunkwatch.reference.client import ChatResult, chat
from chunkwatch.reference.gateway import Gateway
from chunkwatch.reference.service import ServiceConfig, ServiceThread, create_app
from chunkwatch.reference.threaded import start_in_thread
from chunkwatch.reference.upstream import Upstream

__all__ = ["add_demo_parser", "run_demo"]

QUESTION = "Why did the stream carry no data?"


def add_demo_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="reproduce the empty-stream incident on loopback")
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--token-delay", type=float, default=0.02)
    p.set_defaults(func=run_demo)


def describe(result: ChatResult) -> str:
    """One paragraph: what the user saw."""
    if result.status != 200:
        return f"HTTP {result.status}: {result.body.decode(errors='replace')}"
    lines = []
    if result.text:
        lines.append(f"answer: {result.text.strip()!r}")
    if result.error:
        lines.append(f"event: error  {result.error['type']}: {result.error['message']}")
    lines.append(
        f"events: {', '.join(e.event for e in result.events) or 'none'}"
        f"  ({result.elapsed * 1000:.0f} ms, {'complete' if result.complete else 'CUT'})"
    )
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    upstream = start_in_thread(Upstream(tokens=args.tokens, token_delay=args.token_delay))
    gateway = start_in_thread(Gateway(upstream.url))
    services = {
        mode: ServiceThread(create_app(ServiceConfig(llm=LLMConfig(url=gateway.url), mode=mode)))
        for mode in ("tokens", "updates")
    }
    try:
        print(f"upstream  {upstream.url}   (local OpenAI-compatible model)")
        print(f"gateway   {gateway.url}   (fault-injecting reverse proxy)")
        print(f"service   {services['tokens'].url}   (Flask + LangGraph, --mode tokens)")
        steps = [
            ("pass", "tokens", "1. healthy gateway, token streaming"),
            ("zero", "tokens", "2. gateway switched to `zero`: 200 text/event-stream, no chunk"),
            ("zero", "updates", "3. same broken gateway, the incident's fix: --mode updates"),
        ]
        ok = True
        for fault, mode, title in steps:
            gateway.server.set_fault(fault)
            result = chat(services[mode].url, QUESTION, timeout=60)
            print(f"\n{title}\n{textwrap.indent(describe(result), '   ')}")
            expected_ok = not (fault == "zero" and mode == "tokens")
            ok &= result.done == expected_ok
        print(
            "\nThe broken gateway answered 200 and closed the stream without data; the SDK saw\n"
            "zero chunks and no error, and langchain-core raised `No generations found in\n"
            "stream` three layers up. Without token streaming from the network, the same\n"
            "gateway serves the answer."
        )
        return 0 if ok else 1
    finally:
        for svc in services.values():
            svc.stop()
        gateway.stop()
        upstream.stop()
