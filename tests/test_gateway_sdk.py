"""What the real openai SDK (AzureOpenAI, sync and async) does under each gateway fault.

One case per mode, matching docs/gateway.md and FAULTS.md: the number of chunks the
SDK yields, whether any content arrived, and the exact exception class, if any. The
client is built as a service would, with ``max_retries=0`` and a small timeout; the
request body is what AzureChatOpenAI sends when streaming (``stream_options``
included).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest

from chunkwatch_lab.fault_gateway import FAULT_MODES, Gateway
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream, answer_tokens

PROMPT = "How do gateways break streams?"
TOKENS = 12  # the session upstream (conftest.py)
ANSWER = "".join(answer_tokens(PROMPT, TOKENS))
TIMEOUT = 1.0  # the SDK's timeout: connect, and between bytes
ALL = TOKENS + 3  # role + tokens + finish + usage chunks


@dataclass(frozen=True)
class Expect:
    """What the SDK does: ``chunks`` yielded, content "full"/"partial"/"none", and the exception."""

    chunks: int
    content: str
    error: type[BaseException] | None = None
    params: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Expect] = {
    "pass": Expect(ALL, "full"),
    "zero": Expect(0, "none"),
    "zero-abrupt": Expect(0, "none", openai.APIConnectionError),
    "done-only": Expect(0, "none"),
    "json": Expect(0, "none"),
    "html": Expect(0, "none"),
    "buffer": Expect(ALL, "full"),
    "buffer-late": Expect(ALL, "full"),
    "truncate": Expect(3, "partial"),
    "truncate-abrupt": Expect(3, "partial", openai.APIConnectionError),
    "stall": Expect(0, "none", openai.APITimeoutError, {"limit": 3}),
    "stall-headers": Expect(0, "none", openai.APITimeoutError, {"limit": 3}),
    # comments every 0.3 s reset the 1 s read timeout: no error, the stream just ends at `limit`
    "keepalive-only": Expect(0, "none", None, {"interval": 0.3, "limit": 1.5}),
    "trickle": Expect(ALL, "full", None, {"bytes": 97, "delay": 0.002}),
    "status": Expect(0, "none", openai.InternalServerError),  # 502 by default
    "reject-stream-options": Expect(0, "none", openai.BadRequestError),
    "malformed": Expect(0, "none", json.JSONDecodeError),
    "no-blank-lines": Expect(0, "none"),
    "error-event": Expect(3, "partial", openai.APIError),
    "gzip-stripped": Expect(0, "none", UnicodeDecodeError),
    "filter-only": Expect(1, "none"),  # the prompt-filter chunk (choices: []), no error
    "inband-error": Expect(4, "partial"),  # 3 events, then {"message": ...} as a chunk: no error
}

STATUS_CASES: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    429: openai.RateLimitError,
    500: openai.InternalServerError,
    502: openai.InternalServerError,
    503: openai.InternalServerError,
    504: openai.InternalServerError,
}


@dataclass
class Seen:
    chunks: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    elapsed: float = 0.0

    @property
    def content(self) -> str:
        return "".join(c.choices[0].delta.content or "" for c in self.chunks if c.choices)

    @property
    def finish_reasons(self) -> list[str]:
        return [
            c.choices[0].finish_reason
            for c in self.chunks
            if c.choices and c.choices[0].finish_reason
        ]


def _create_args() -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def stream_sync(url: str) -> Seen:
    client = openai.AzureOpenAI(
        azure_endpoint=url,
        api_key="test-key",
        api_version="2024-10-21",
        max_retries=0,
        timeout=TIMEOUT,
    )
    seen, start = Seen(), time.perf_counter()
    try:
        for chunk in client.chat.completions.create(**_create_args()):
            seen.chunks.append(chunk)
    except Exception as err:
        seen.error = err
    finally:
        client.close()
    seen.elapsed = time.perf_counter() - start
    return seen


def stream_async(url: str) -> Seen:
    async def run() -> Seen:
        client = openai.AsyncAzureOpenAI(
            azure_endpoint=url,
            api_key="test-key",
            api_version="2024-10-21",
            max_retries=0,
            timeout=TIMEOUT,
        )
        seen, start = Seen(), time.perf_counter()
        try:
            async for chunk in await client.chat.completions.create(**_create_args()):
                seen.chunks.append(chunk)
        except Exception as err:
            seen.error = err
        finally:
            await client.close()
        seen.elapsed = time.perf_counter() - start
        return seen

    return asyncio.run(run())


def check(seen: Seen, expect: Expect) -> None:
    if expect.error is None:
        assert seen.error is None, f"unexpected {seen.error!r}"
    else:
        assert type(seen.error) is expect.error, (
            f"expected {expect.error.__name__}, got {seen.error!r}"
        )
    assert len(seen.chunks) == expect.chunks
    if expect.content == "full":
        assert seen.content == ANSWER and seen.finish_reasons == ["stop"]
    elif expect.content == "partial":
        assert seen.content and ANSWER.startswith(seen.content) and seen.content != ANSWER
        assert seen.finish_reasons == []  # a cut-off answer carries no finish reason
    else:
        assert seen.content == ""


def test_every_mode_has_a_case() -> None:
    """The table below covers FAULT_MODES exactly."""
    assert tuple(CASES) == FAULT_MODES


@pytest.mark.parametrize("mode", FAULT_MODES)
def test_sdk_outcome_per_mode(gateway: Running[Gateway], mode: str) -> None:
    """openai.AzureOpenAI through the gateway in `mode`: chunks, content and exception as
    in CASES. keepalive-only: the comments reset the 1 s read timeout, so the SDK waits the
    gateway's whole 1.5 s `limit` and then returns zero chunks without an error."""
    expect = CASES[mode]
    gateway.server.set_fault(mode, **expect.params)
    seen = stream_sync(gateway.url)
    check(seen, expect)
    if mode == "keepalive-only":
        assert seen.elapsed >= 1.4


@pytest.mark.parametrize(
    "mode", ["zero", "zero-abrupt", "truncate", "truncate-abrupt", "stall", "error-event"]
)
def test_async_sdk_outcome_matches_sync(gateway: Running[Gateway], mode: str) -> None:
    """AsyncAzureOpenAI (what LangChain's ainvoke uses) behaves as the sync client."""
    expect = CASES[mode]
    gateway.server.set_fault(mode, **expect.params)
    check(stream_async(gateway.url), expect)


@pytest.mark.parametrize("status", sorted(STATUS_CASES))
def test_sdk_status_errors(gateway: Running[Gateway], status: int) -> None:
    """status=N: 400 BadRequestError, 429 RateLimitError, 5xx InternalServerError; a 502/503/504
    error carries the gateway's HTML page as its body text."""
    gateway.server.set_fault("status", status=status)
    seen = stream_sync(gateway.url)
    assert type(seen.error) is STATUS_CASES[status] and seen.chunks == []
    assert isinstance(seen.error, openai.APIStatusError) and seen.error.status_code == status
    if status >= 502:
        assert "<html>" in seen.error.response.text
    if status == 429:
        assert seen.error.response.headers["retry-after"] == "1"


def test_stall_times_out_after_the_sdk_timeout_not_the_gateway_limit(
    gateway: Running[Gateway],
) -> None:
    """stall / stall-headers end with APITimeoutError after ~TIMEOUT s, long before `limit`."""
    for mode in ("stall", "stall-headers"):
        gateway.server.set_fault(mode, limit=30)
        seen = stream_sync(gateway.url)
        assert type(seen.error) is openai.APITimeoutError
        assert TIMEOUT * 0.9 <= seen.elapsed < TIMEOUT + 1


def test_non_stream_call_succeeds_under_every_fault(gateway: Running[Gateway]) -> None:
    """The same client without stream=True gets the full answer whatever the fault."""
    client = openai.AzureOpenAI(
        azure_endpoint=gateway.url,
        api_key="k",
        api_version="2024-10-21",
        max_retries=0,
        timeout=TIMEOUT,
    )
    for mode in FAULT_MODES:
        gateway.server.set_fault(mode, **CASES[mode].params)
        args = {k: v for k, v in _create_args().items() if k not in ("stream", "stream_options")}
        done = client.chat.completions.create(**args)
        assert done.choices[0].message.content == ANSWER, mode
    client.close()


@pytest.mark.parametrize(
    ("mode", "chunks", "content"), [("pass", ALL + 1, "full"), ("truncate", 3, "partial")]
)
def test_sdk_through_the_gateway_with_an_azure_content_filtering_upstream(
    azure_upstream: Running[Upstream], mode: str, chunks: int, content: str
) -> None:
    """Azure's prompt-filter event reaches the SDK as one more chunk, first, with
    `choices == []`: pass yields it and the full answer; truncate counts it as one of its
    3 data events (filter, role, one token), so the answer is cut a token earlier."""
    with start_in_thread(Gateway(azure_upstream.url, fault=mode)) as gw:
        seen = stream_sync(gw.url)
    check(seen, Expect(chunks, content))
    assert seen.chunks[0].choices == []
    assert (seen.chunks[0].model_extra or {})["prompt_filter_results"][0]["prompt_index"] == 0
    if mode == "truncate":
        assert seen.content == answer_tokens(PROMPT, TOKENS)[0]
