"""Exceptions chunkwatch raises into the application, each carrying the verdict."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx2

if TYPE_CHECKING:
    from chunkwatch.verdict import Verdict

__all__ = ["StreamEmptyError", "StreamStalledError", "StreamTruncatedError"]

NO_GENERATIONS = "No generations found in stream."


def _where(verdict: Verdict | None, *, public: bool = False) -> str:
    """`` [outcome@layer: detail]`` (the client's detail with ``public``), or nothing."""
    if verdict is None or verdict.ok:
        return ""
    return f" [{verdict}: {verdict.client_detail if public else verdict.detail}]"


class StreamEmptyError(ValueError):
    """A token stream ended with no completion: zero chunks, or only chunks that carry
    none (Azure prompt-filter annotations, usage).

    Raised where langchain-core would raise ``ValueError("No generations found in
    stream.")`` (and chained to it), or where the openai SDK's stream ended with
    no chunk at all. A ``ValueError``, so existing ``except ValueError`` code still
    works; the message starts with langchain-core's, so existing log searches do
    too. ``verdict`` names the layer where the data stopped.
    """

    def __init__(self, verdict: Verdict | None, message: str = NO_GENERATIONS) -> None:
        self.verdict = verdict
        self.public_message = message + _where(verdict, public=True)  # for a client
        super().__init__(message + _where(verdict))


class StreamTruncatedError(ValueError):
    """A token stream ended cleanly after content but without a ``finish_reason``.

    The openai SDK and langchain accept such a stream as a complete (cut) answer;
    chunkwatch raises instead, so the application can tell the user, and a cut
    answer is not stored as a finished one. ``verdict`` names the layer
    (usually ``truncated@gateway``).
    """

    def __init__(self, verdict: Verdict | None, chunks: int) -> None:
        self.verdict = verdict
        message = (
            f"the model's stream ended after {chunks} chunks without a finish_reason: "
            "the answer is incomplete"
        )
        self.public_message = message + _where(verdict, public=True)  # for a client
        super().__init__(message + _where(verdict))


class StreamStalledError(httpx2.ReadTimeout):
    """The watchdog aborted a stream that passed its first-chunk or idle deadline.

    A read timeout to the HTTP stack (the openai SDK turns it into
    ``APITimeoutError``, chained to this), so code that handles timeouts handles
    it. ``kind`` is ``"first_chunk"`` or ``"idle"``; ``after`` the seconds waited.
    """

    def __init__(self, kind: str, after: float, layer: str) -> None:
        self.kind, self.after, self.layer = kind, after, layer
        which = "first chunk" if kind == "first_chunk" else "next chunk"
        super().__init__(
            f"{layer}: no {which} within {after:.1f} s; chunkwatch aborted the stalled stream"
        )
