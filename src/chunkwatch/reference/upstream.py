"""``chunkwatch upstream``: a local OpenAI / Azure OpenAI compatible model endpoint.

Usage::

    chunkwatch upstream --port 8400 --tokens 12 --token-delay 0.02
    chunkwatch upstream --first-token-delay 0.5 --azure-content-filter
    # or, in-process:
    from chunkwatch.reference.threaded import start_in_thread
    with start_in_thread(Upstream(tokens=12, token_delay=0.02)) as up:
        client = openai.OpenAI(base_url=up.url + "/v1", api_key="any")

Routes: ``POST /v1/chat/completions`` and
``POST /openai/deployments/{deployment}/chat/completions?api-version=...`` (any
API key or none); ``GET /_stats`` (request counters as JSON), ``DELETE /_stats``.

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
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from chunkwatch.reference._http import HTTPServer, Request, Responder
from chunkwatch.reference.threaded import run_until_signal
from chunkwatch.sse import format_event

__all__ = [
    "TOOL_MARKER",
    "Upstream",
    "add_upstream_parser",
    "answer_tokens",
    "main",
    "run_upstream",
    "tool_call_id",
    "upstream_from_args",
]

TOOL_MARKER = "[[tool]]"
_VOCABULARY = (
    "alpha amber anchor apple arrow aspen atlas autumn basil beacon birch bloom breeze brook "
    "canyon cedar cinder clover comet coral crystal dawn delta dune echo ember fable falcon "
    "fern field flint forest frost garnet glacier harbor hazel horizon indigo iris island ivory "
    "jasper juniper lagoon lantern lark linen lotus lunar maple meadow mesa mint moss nectar "
    "north oak ocean olive onyx orbit pebble pine prairie quartz quill raven reef ridge river "
    "saffron sage sierra silver slate spruce summit tide timber topaz tundra valley velvet willow"
).split()
_CHAT_PATHS = ("/v1/chat/completions",)
_AZURE_PREFIX = "/openai/deployments/"
_FINGERPRINT = "fp_chunkwatch"
_ARG_FRAGMENT = 12  # characters of tool-call arguments per streamed fragment
_SSE_HEADERS = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache")]
_SAFE = {"filtered": False, "severity": "safe"}
_CONTENT_FILTER = {"hate": _SAFE, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE}
_PROMPT_FILTER = [
    {
        "prompt_index": 0,
        "content_filter_results": {
            **_CONTENT_FILTER,
            "jailbreak": {"filtered": False, "detected": False},
        },
    }
]


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def answer_tokens(prompt: str, tokens: int) -> list[str]:
    """The answer to ``prompt`` as ``tokens`` tokens; ``"".join(...)`` is the answer.

    Words come from a fixed vocabulary, picked by a generator seeded with a stable
    hash of ``prompt``: the same prompt always gets the same answer, in every
    process. Each token is ``"word "``, the last one ``"word."``.
    """
    rng = random.Random(_stable_int(prompt))
    words = [rng.choice(_VOCABULARY) for _ in range(tokens)]
    return [f"{w} " for w in words[:-1]] + [f"{w}." for w in words[-1:]]


def tool_call_id(text: str) -> str:
    """The id of the tool call answered to a user message ``text``."""
    return f"call_{hashlib.sha256(text.encode()).hexdigest()[:24]}"


class BadRequest(Exception):
    """A request OpenAI would answer with 400 invalid_request_error."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def openai_error(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -- the request ---------------------------------------------------------------------------


def _text(content: Any) -> str:
    """The text of a message's content (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _parse(body: bytes) -> dict[str, Any]:
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(
            f"We could not parse the JSON body of your request ({err}). The OpenAI API expects "
            "a JSON payload."
        ) from err
    if not isinstance(req, dict):
        raise BadRequest("The request body must be a JSON object.")
    messages = req.get("messages")
    if messages is None:
        raise BadRequest(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list):
        kind = type(messages).__name__
        raise BadRequest(
            f"Invalid type for 'messages': expected an array, but got {kind} instead.",
            "messages",
            "invalid_type",
        )
    if not messages:
        raise BadRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an "
            "empty array instead.",
            "messages",
            "empty_array",
        )
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            message = f"Invalid 'messages[{i}]': expected an object with a string 'role'."
            raise BadRequest(message, f"messages[{i}]", "invalid_type")
    if not isinstance(req.get("stream", False), bool):
        raise BadRequest("Invalid type for 'stream': expected a boolean.", "stream", "invalid_type")
    return req


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if msg["role"] == "user":
            return _text(msg.get("content"))
    return ""


def _wants_tool(req: dict[str, Any]) -> dict[str, Any] | None:
    """The tool to call, if this request is answered with a tool call."""
    tools, last = req.get("tools"), req["messages"][-1]
    if not tools or not isinstance(tools, list) or last["role"] != "user":
        return None
    if TOOL_MARKER not in _text(last.get("content")):
        return None
    first = tools[0] if isinstance(tools[0], dict) else {}
    name = (first.get("function") or {}).get("name") or first.get("name") or "tool"
    return {"name": str(name)}


class _Answer:
    """What one request is answered: text tokens, or one tool call (Azure-filtered or not)."""

    def __init__(self, req: dict[str, Any], model: str, tokens: int, filtered: bool) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.filtered = filtered
        user = _last_user_text(req["messages"])
        self.prompt_tokens = sum(len(_text(m.get("content")).split()) + 4 for m in req["messages"])
        tool = _wants_tool(req)
        self.tool_call: dict[str, Any] | None = None
        self.tokens: list[str] = []
        if tool is not None:
            args = json.dumps({"query": user})
            self.tool_call = {"id": tool_call_id(user), "name": tool["name"], "arguments": args}
            self.pieces = [args[i : i + _ARG_FRAGMENT] for i in range(0, len(args), _ARG_FRAGMENT)]
        else:
            self.tokens = answer_tokens(user, tokens)
            self.pieces = self.tokens
        self.finish_reason = "tool_calls" if self.tool_call else "stop"

    def usage(self) -> dict[str, int]:
        n = len(self.pieces)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
        }

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.tokens),
            "refusal": None,
        }
        if self.tool_call:
            tc = self.tool_call
            function = {"name": tc["name"], "arguments": tc["arguments"]}
            message["content"] = None
            message["tool_calls"] = [{"id": tc["id"], "type": "function", "function": function}]
        choice = self._choice("message", message, self.finish_reason)
        body = {**self._envelope("chat.completion"), "choices": [choice], "usage": self.usage()}
        return {**body, "prompt_filter_results": _PROMPT_FILTER} if self.filtered else body

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> str:
        choice = self._choice("delta", delta, finish)
        return json.dumps({**self._envelope("chat.completion.chunk"), "choices": [choice]})

    def first_delta(self) -> dict[str, Any]:
        if not self.tool_call:
            return {"role": "assistant", "content": "", "refusal": None}
        tc = self.tool_call
        function = {"name": tc["name"], "arguments": ""}
        call = {"index": 0, "id": tc["id"], "type": "function", "function": function}
        return {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}

    def piece_delta(self, piece: str) -> dict[str, Any]:
        if self.tool_call:
            return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
        return {"content": piece}

    def usage_chunk(self) -> str:
        return json.dumps(
            {**self._envelope("chat.completion.chunk"), "choices": [], "usage": self.usage()}
        )

    def prompt_filter_chunk(self) -> str:
        """Azure's first stream event: the prompt's filter results, before any choice."""
        envelope = {"id": "", "object": "", "created": 0, "model": "", "choices": []}
        return json.dumps({**envelope, "prompt_filter_results": _PROMPT_FILTER})

    def _choice(self, key: str, value: dict[str, Any], finish: str | None) -> dict[str, Any]:
        """A choice with ``key`` ("delta" or "message"); Azure also rates its text."""
        choice = {"index": 0, key: value, "logprobs": None, "finish_reason": finish}
        if self.filtered:  # the role, tool-call and finish choices carry {}
            choice["content_filter_results"] = _CONTENT_FILTER if value.get("content") else {}
        return choice

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": _FINGERPRINT,
        }


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
        """Zero the counters (``active_streams`` keeps counting the streams still open)."""
        active = self.stats["active_streams"]
        self.stats.update(_zero_stats(), active_streams=active)

    async def _handle(self, req: Request, resp: Responder) -> None:
        path = req.path
        if path == "/_stats":
            await self._stats(req, resp)
        elif path not in _CHAT_PATHS and _azure_deployment(path) is None:
            message = f"Unknown request URL: {req.method} {path}."
            error = openai_error(message, "invalid_request_error", None, "unknown_url")
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
        await resp.send_json(200, self.stats)

    async def _chat(self, req: Request, resp: Responder, deployment: str | None) -> None:
        self.stats["requests"] += 1
        try:
            body = _parse(req.body)
        except BadRequest as err:
            self.stats["bad_requests"] += 1
            error = openai_error(err.message, "invalid_request_error", err.param, err.code)
            await resp.send_json(400, error)
            return
        model = body.get("model") or deployment or "chunkwatch-upstream"
        tokens, filtered = max(0, int(self.tokens)), bool(self.content_filter)
        answer = _Answer(body, str(model), tokens, filtered)
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
        self, resp: Responder, answer: _Answer, usage: bool, ttft: float, delay: float
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
            tail = format_event(answer.chunk({}, answer.finish_reason))
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
    """``python -m chunkwatch.reference.upstream [--port N ...]``."""
    parser = argparse.ArgumentParser(prog="python -m chunkwatch.reference.upstream")
    add_upstream_parser(parser.add_subparsers(dest="command", required=True))
    return run_upstream(parser.parse_args(["upstream", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
