"""The gateway's canned answers and its buffering logic, without I/O.

:func:`aggregate` is the ``json`` fault's logic: the ``chat.completion`` a
buffering gateway builds from ``chat.completion.chunk`` events.
:func:`openai_error` is an OpenAI-style error body; :func:`status_body` the one a
gateway answers with a given status; :func:`nginx_page` the HTML error page nginx
answers a 502, 503 or 504 with (:data:`NGINX_TITLES`); :data:`BLOCK_PAGE` a
corporate web filter's block page. :mod:`chunkwatch_lab.faults` sends them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from chunkwatch.sse import Event
from chunkwatch_lab._answer import openai_error

__all__ = [
    "BLOCK_PAGE",
    "NGINX_TITLES",
    "aggregate",
    "nginx_page",
    "openai_error",
    "status_body",
]


def aggregate(events: Sequence[Event]) -> dict[str, Any]:
    """The ``chat.completion`` a gateway builds from ``chat.completion.chunk`` events.

    The envelope (id, created, model) comes from the first chunk that has an id, so
    Azure's prompt-filter chunk (``"id": ""``, ``choices: []``) does not blank it.
    """
    first: dict[str, Any] = {}
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish, usage = None, None
    for event in events:
        try:
            obj = json.loads(event.data)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        first = first or (obj if obj.get("id") else {})
        usage = obj.get("usage") or usage
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            content.append(delta.get("content") or "")
            for call in delta.get("tool_calls") or []:
                _merge_call(calls.setdefault(call.get("index", 0), {}), call)
            finish = choice.get("finish_reason") or finish
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
    if calls:
        message["content"] = message["content"] or None
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    result = {
        "id": first.get("id", "chatcmpl-gateway"),
        "object": "chat.completion",
        "created": first.get("created", int(time.time())),
        "model": first.get("model", ""),
        "choices": [choice],
    }
    return {**result, "usage": usage} if usage else result


def _merge_call(into: dict[str, Any], delta: dict[str, Any]) -> None:
    if delta.get("id"):
        into["id"] = delta["id"]
        into["type"] = delta.get("type", "function")
    fn = into.setdefault("function", {"name": "", "arguments": ""})
    part = delta.get("function") or {}
    fn["name"] = part.get("name") or fn["name"]
    fn["arguments"] += part.get("arguments") or ""


# -- canned error pages and bodies ---------------------------------------------------------

_RATE_LIMITED = "Rate limit reached for requests. Please retry after 1 second."
_STATUS_ERRORS = {
    400: ("The gateway rejected the request: invalid request.", "invalid_request_error", None),
    429: (_RATE_LIMITED, "requests", "rate_limit_exceeded"),
}
_SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"
NGINX_TITLES = {
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
}


def status_body(status: int) -> dict[str, Any]:
    """The OpenAI-style error body a gateway answers ``status`` with."""
    if status in _STATUS_ERRORS:
        message, type_, code = _STATUS_ERRORS[status]
        return openai_error(message, type_, code=code)
    if status >= 500:
        return openai_error(_SERVER_ERROR, "server_error")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return openai_error(f"{status} {phrase} (from the gateway)", "invalid_request_error")


def nginx_page(status: int) -> str:
    """nginx's own error page for ``status`` (a key of :data:`NGINX_TITLES`)."""
    title = f"{status} {NGINX_TITLES[status]}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )


BLOCK_PAGE = """<!DOCTYPE html>
<html><head><title>Access Denied</title></head>
<body>
<h1>Web Page Blocked</h1>
<p>Access to the requested resource has been blocked by your organization's web gateway
(policy: streaming content inspection).</p>
<p>If you believe this is an error, contact your IT service desk.</p>
</body></html>
"""
