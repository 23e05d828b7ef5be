"""A small SSE client for the reference service's ``POST /chat``: what the user saw.

Used by ``chunkwatch demo``, the doctor's downstream check and the tests. It
reads the body with the shared strict parser, so what it reports is what a
browser's ``EventSource`` would have dispatched.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from chunkwatch.sse import Event, SSEParser

__all__ = ["ChatResult", "chat"]


@dataclass
class ChatResult:
    """Everything one ``/chat`` call delivered, in order."""

    status: int
    content_type: str
    events: list[Event] = field(default_factory=list)
    comments: int = 0
    complete: bool = False  # the body ended cleanly (not cut mid-stream)
    body: bytes = b""  # the raw body of a non-SSE answer (a JSON error)
    elapsed: float = 0.0
    first_event_after: float | None = None
    first_content_after: float | None = None  # the first `token` or `update` event

    def named(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(e.data) for e in self.events if e.event == name]

    @property
    def text(self) -> str:
        """The answer as the user saw it: tokens, or the assistant messages of updates."""
        tokens = "".join(p["text"] for p in self.named("token"))
        if tokens:
            return tokens
        return "".join(
            m["content"]
            for u in self.named("update")
            for m in u.get("messages", [])
            if m.get("role") == "assistant"
        )

    @property
    def error(self) -> dict[str, Any] | None:
        errors = self.named("error")
        return errors[-1] if errors else None

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].event == "done"

    @property
    def last_event(self) -> str | None:
        return self.events[-1].event if self.events else None


def chat(
    base_url: str,
    message: str,
    *,
    thread_id: str | None = None,
    timeout: float = 60.0,
    headers: dict[str, str] | None = None,
) -> ChatResult:
    """POST ``message`` to ``base_url``/chat and read the whole answer."""
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=timeout)
    payload: dict[str, Any] = {"message": message}
    if thread_id is not None:
        payload["thread_id"] = thread_id
    t0 = time.perf_counter()
    try:
        conn.request(
            "POST",
            url.path.rstrip("/") + "/chat",
            body=json.dumps(payload),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        resp = conn.getresponse()
        result = ChatResult(resp.status, resp.getheader("Content-Type", ""))
        if result.content_type.startswith("text/event-stream"):
            _read_events(resp, result, t0)
        else:
            result.body = resp.read()
            result.complete = True
    finally:
        conn.close()
    result.elapsed = time.perf_counter() - t0
    return result


def _read_events(resp: http.client.HTTPResponse, result: ChatResult, t0: float) -> None:
    parser = SSEParser(collect=True, strict_json=False)
    try:
        while chunk := resp.read1(65536):
            for ev in parser.feed(chunk):
                if result.first_event_after is None:
                    result.first_event_after = time.perf_counter() - t0
                if result.first_content_after is None and ev.event in ("token", "update"):
                    result.first_content_after = time.perf_counter() - t0
                result.events.append(ev)
        result.complete = True
    except http.client.IncompleteRead:
        result.complete = False
    result.events.extend(parser.close())
    result.comments = parser.comments
