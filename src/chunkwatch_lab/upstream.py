"""``chunkwatch upstream``: a local OpenAI / Azure OpenAI compatible model endpoint.

Usage::

    chunkwatch upstream --port 8400 --tokens 12 --token-delay 0.02
    chunkwatch upstream --first-token-delay 0.5 --azure-content-filter
    # or, in-process:
    from chunkwatch_lab.threaded import start_in_thread
    with start_in_thread(Upstream(tokens=12, token_delay=0.02)) as up:
        client = openai.OpenAI(base_url=up.url + "/v1", api_key="any")

Routes: ``POST /v1/chat/completions`` and
``POST /openai/deployments/{deployment}/chat/completions?api-version=...`` (any
API key or none); ``GET /_stats`` (request counters as JSON, and ``traceparents``: the
W3C ``traceparent`` header of the last 32 chat requests, oldest first, ``null`` where a
request had none -- so a test can check that a client's trace reached the model),
``DELETE /_stats`` (zeroes the counters, clears ``traceparents``).

Answers are deterministic (:func:`answer_tokens` of the last ``user`` message's
text). ``stream: true`` is OpenAI's exact chunk sequence -- role chunk, one chunk
per token, finish chunk, usage chunk if ``stream_options.include_usage``,
``[DONE]`` -- with the head at once, the role chunk ``first_token_delay`` seconds
later and the tokens ``token_delay`` apart on an absolute schedule. ``stream:
false`` answers one ``chat.completion`` after that same generation time.
``content_filter`` answers as Azure OpenAI with content filtering does (a
prompt-filter chunk first, ``content_filter_results`` on choices). A request with
``tools`` whose last ``user`` message contains ``[[tool]]`` is answered with one
call to the first tool. The four settings (``tokens``, ``token_delay``,
``first_token_delay``, ``content_filter``) may be changed while the server runs.
Malformed requests get OpenAI-style 400s. ``docs/upstream.md`` is the reference.

This module is the server, its counters, settings and command line; what a
request is answered (validation, chunk and completion shapes) is the I/O-free
:mod:`chunkwatch_lab._answer`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

from chunkwatch.sse import format_event
from chunkwatch_lab._answer import (
    TOOL_MARKER,
    Answer,
    BadRequest,
    answer_tokens,
    content_filter_error,
    openai_error,
    parse_request,
    prompt_filtered,
    tool_call_id,
)
from chunkwatch_lab._http import HTTPServer, Request, Responder
from chunkwatch_lab.threaded import run_until_signal

__all__ = [
    "TOOL_MARKER",
    "TRACEPARENTS_KEPT",
    "Upstream",
    "add_upstream_parser",
    "answer_tokens",
    "main",
    "run_upstream",
    "tool_call_id",
    "upstream_from_args",
]

_CHAT_PATHS = ("/v1/chat/completions",)
_AZURE_PREFIX = "/openai/deployments/"
TRACEPARENTS_KEPT = 32  # the ``traceparent`` headers ``/_stats`` shows
_SSE_HEADERS = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache")]


# -- the server ----------------------------------------------------------------------------


def _zero_stats() -> dict[str, int]:
    return {
        "requests": 0,
        "stream_requests": 0,
        "non_stream_requests": 0,
        "bad_requests": 0,
        "active_streams": 0,
        "completed_streams": 0,
        "aborted_streams": 0,
    }


class Upstream:
    """The model endpoint. Its four answer settings may be changed while it runs."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: int = 12,
        token_delay: float = 0.02,
        first_token_delay: float = 0.0,
        content_filter: bool = False,
    ) -> None:
        self.tokens = tokens
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay
        self.content_filter = content_filter
        self._http = HTTPServer(self._handle, host, port)
        self.stats = _zero_stats()
        # the ``traceparent`` header of the last chat requests (None: none sent), newest last
        self.traceparents: deque[str | None] = deque(maxlen=TRACEPARENTS_KEPT)

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def url(self) -> str:
        return f"http://{self._http.host}:{self.port}"

    async def start(self) -> None:
        await self._http.start()

    async def stop(self) -> None:
        await self._http.stop()

    def reset_stats(self) -> None:
        """Zero the counters (``active_streams`` keeps counting the streams still open) and
        forget the traceparents."""
        active = self.stats["active_streams"]
        self.stats.update(_zero_stats(), active_streams=active)
        self.traceparents.clear()

    async def _handle(self, req: Request, resp: Responder) -> None:
        path = req.path
        if path == "/_stats":
            await self._stats(req, resp)
        elif path not in _CHAT_PATHS and _azure_deployment(path) is None:
            message = f"Unknown request URL: {req.method} {path}."
            error = openai_error(message, "invalid_request_error", code="unknown_url")
            await resp.send_json(404, error)
        elif req.method != "POST":
            error = openai_error(
                f"Method {req.method} not allowed; use POST.", "invalid_request_error"
            )
            await resp.send_json(405, error, [("Allow", "POST")])
        else:
            await self._chat(req, resp, _azure_deployment(path))

    async def _stats(self, req: Request, resp: Responder) -> None:
        if req.method == "DELETE":
            self.reset_stats()
        elif req.method != "GET":
            error = openai_error("Use GET or DELETE on /_stats.", "invalid_request_error")
            await resp.send_json(405, error, [("Allow", "GET, DELETE")])
            return
        await resp.send_json(200, {**self.stats, "traceparents": list(self.traceparents)})

    async def _chat(self, req: Request, resp: Responder, deployment: str | None) -> None:
        self.stats["requests"] += 1
        self.traceparents.append(req.header("traceparent"))
        try:
            body = parse_request(req.body)
        except BadRequest as err:
            self.stats["bad_requests"] += 1
            error = openai_error(
                err.message, "invalid_request_error", code=err.code, param=err.param
            )
            await resp.send_json(400, error)
            return
        if prompt_filtered(body):  # Azure's content filter refuses this user's prompt
            self.stats["bad_requests"] += 1
            await resp.send_json(400, content_filter_error())
            return
        model = body.get("model") or deployment or "chunkwatch-upstream"
        tokens, filtered = max(0, int(self.tokens)), bool(self.content_filter)
        answer = Answer(body, str(model), tokens, filtered)
        ttft, delay = max(0.0, float(self.first_token_delay)), max(0.0, float(self.token_delay))
        if not body.get("stream"):
            self.stats["non_stream_requests"] += 1
            await asyncio.sleep(ttft + len(answer.pieces) * delay)  # the model's generation time
            await resp.send_json(200, answer.completion())
            return
        self.stats["stream_requests"] += 1
        options = body.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        await self._stream(resp, answer, usage, ttft, delay)

    async def _stream(
        self, resp: Responder, answer: Answer, usage: bool, ttft: float, delay: float
    ) -> None:
        self.stats["active_streams"] += 1
        outcome = "aborted_streams"
        try:
            head = [*_SSE_HEADERS, ("x-request-id", answer.id)]
            prelude = format_event(answer.prompt_filter_chunk()) if answer.filtered else b""
            role = format_event(answer.chunk(answer.first_delta()))
            if ttft > 0:  # the head (and Azure's prompt filter) at once, the role chunk later
                await resp.start(200, head, body=prelude)
                await asyncio.sleep(ttft)
                await resp.write(role)
            else:
                await resp.start(200, head, body=prelude + role)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i, piece in enumerate(answer.pieces, 1):
                wait = start + i * delay - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await resp.write(format_event(answer.chunk(answer.piece_delta(piece))))
            tail: bytes = format_event(answer.chunk({}, answer.finish_reason))
            if usage:
                tail += format_event(answer.usage_chunk())
            await resp.write(tail + format_event("[DONE]"))
            await resp.end()
            outcome = "completed_streams"
        finally:
            self.stats["active_streams"] -= 1
            self.stats[outcome] += 1


def _azure_deployment(path: str) -> str | None:
    """``{deployment}`` of ``/openai/deployments/{deployment}/chat/completions``."""
    if not path.startswith(_AZURE_PREFIX) or not path.endswith("/chat/completions"):
        return None
    name = path[len(_AZURE_PREFIX) : -len("/chat/completions")]
    return name if name and "/" not in name else None


# -- command line --------------------------------------------------------------------------


def add_upstream_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``upstream`` subcommand to an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "upstream",
        help="run a local OpenAI / Azure OpenAI compatible model endpoint",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8400, help="port (default 8400; 0 picks a free one)")
    p.add_argument("--tokens", type=int, default=12, help="tokens per answer (default 12)")
    p.add_argument(
        "--token-delay", type=float, default=0.02, help="seconds between tokens (default 0.02)"
    )
    p.add_argument(
        "--first-token-delay",
        type=float,
        default=0.0,
        help="seconds before the first token, after the response head (default 0)",
    )
    p.add_argument(
        "--azure-content-filter",
        action="store_true",
        help="answer as Azure OpenAI with content filtering: prompt and content filter results",
    )
    p.set_defaults(func=run_upstream)
    return p


def upstream_from_args(args: argparse.Namespace) -> Upstream:
    """An :class:`Upstream` from parsed ``upstream`` arguments."""
    return Upstream(
        args.host,
        args.port,
        tokens=args.tokens,
        token_delay=args.token_delay,
        first_token_delay=args.first_token_delay,
        content_filter=args.azure_content_filter,
    )


def run_upstream(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; exit status 0."""
    return asyncio.run(run_until_signal(upstream_from_args(args), "upstream"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m chunkwatch_lab.upstream [--port N ...]``."""
    parser = argparse.ArgumentParser(prog="python -m chunkwatch_lab.upstream")
    add_upstream_parser(parser.add_subparsers(dest="command", required=True))
    return run_upstream(parser.parse_args(["upstream", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
