"""What the reference service accepts on ``POST /chat``: I/O-free, so every refusal is a
clear 400 and nothing a client sends can surface later as a 500 or a failed stream."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_THREAD_ID", "BadInput", "ChatInput", "parse_chat"]

MAX_THREAD_ID = 128


class BadInput(ValueError):
    """A request the service refuses: ``kind`` is the error's ``type``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message, self.kind = message, kind


@dataclass(frozen=True)
class ChatInput:
    message: str
    thread_id: str | None  # None: a new conversation


def parse_chat(raw: bytes) -> ChatInput:
    """The chat request in ``raw``, or :class:`BadInput`. Invalid UTF-8 or JSON, nesting
    too deep for the parser (``RecursionError``) and text no UTF-8 encoder accepts (a lone
    surrogate from ``"\\ud800"``, which would fail only when sent to the model) are the
    client's errors."""
    try:
        body: Any = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        raise BadInput("the body must be a JSON object", "invalid_json")
    message = body.get("message")
    if not isinstance(message, str) or not message.strip():
        raise BadInput("`message` must be a non-empty string", "invalid_message")
    if not _encodable(message):
        raise BadInput(
            "`message` must be valid Unicode text (no lone surrogates)", "invalid_message"
        )
    thread_id = body.get("thread_id")
    if thread_id is not None and (
        not isinstance(thread_id, str)
        or not 0 < len(thread_id) <= MAX_THREAD_ID
        or not _encodable(thread_id)
    ):
        raise BadInput(
            f"`thread_id` must be a string of 1..{MAX_THREAD_ID} chars", "invalid_thread_id"
        )
    return ChatInput(message, thread_id)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
