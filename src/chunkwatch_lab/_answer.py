"""What the reference upstream answers, without I/O: request validation and response shapes.

:func:`parse_request` validates a ``chat/completions`` body as OpenAI does
(:class:`BadRequest` carries the 400's message, param and code);
:class:`Answer` is one request's answer -- text tokens from :func:`answer_tokens`,
or one call to the first tool when the last ``user`` message contains
:data:`TOOL_MARKER` -- with its OpenAI ``chat.completion`` and
``chat.completion.chunk`` shapes and, when ``filtered``, Azure OpenAI's
content-filter results. :func:`openai_error` is OpenAI's error body.
:mod:`chunkwatch_lab.upstream` serves them.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from typing import Any

__all__ = [
    "FILTER_MARKER",
    "TOOL_MARKER",
    "Answer",
    "BadRequest",
    "answer_tokens",
    "content_filter_error",
    "openai_error",
    "parse_request",
    "prompt_filtered",
    "tool_call_id",
]

TOOL_MARKER = "[[tool]]"
FILTER_MARKER = "[[filtered]]"  # a prompt Azure's content filter refuses (HTTP 400)
_VOCABULARY = (
    "alpha amber anchor apple arrow aspen atlas autumn basil beacon birch bloom breeze brook "
    "canyon cedar cinder clover comet coral crystal dawn delta dune echo ember fable falcon "
    "fern field flint forest frost garnet glacier harbor hazel horizon indigo iris island ivory "
    "jasper juniper lagoon lantern lark linen lotus lunar maple meadow mesa mint moss nectar "
    "north oak ocean olive onyx orbit pebble pine prairie quartz quill raven reef ridge river "
    "saffron sage sierra silver slate spruce summit tide timber topaz tundra valley velvet willow"
).split()
_FINGERPRINT = "fp_chunkwatch"
_ARG_FRAGMENT = 12  # characters of tool-call arguments per streamed fragment
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
    message: str, type_: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """An OpenAI-style error body (the upstream's and the gateway's)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def content_filter_error() -> dict[str, Any]:
    """Azure OpenAI's 400 for a prompt its content filter refuses (stream or not)."""
    return {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
            "content management policy. Please modify your prompt and retry.",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {
                    "hate": {"filtered": True, "severity": "high"},
                    "self_harm": {"filtered": False, "severity": "safe"},
                    "sexual": {"filtered": False, "severity": "safe"},
                    "violence": {"filtered": False, "severity": "safe"},
                },
            },
        }
    }


def prompt_filtered(req: dict[str, Any]) -> bool:
    """True when the last user message carries :data:`FILTER_MARKER`."""
    for msg in reversed(req.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return FILTER_MARKER in _text(msg.get("content"))
    return False


# -- the request ---------------------------------------------------------------------------


def _text(content: Any) -> str:
    """The text of a message's content (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def parse_request(body: bytes) -> dict[str, Any]:
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


class Answer:
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
