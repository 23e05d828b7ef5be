"""The reproduction is faithful: the uninstrumented service behind each gateway fault.

Real processes on loopback: the local upstream, the fault-injecting gateway, the
reference Flask service (``--no-instrument``) with real LangGraph and the real
openai SDK (``AzureChatOpenAI``, its default ``timeout=None``, ``max_retries=0``).
Each case pins what the *user* receives in ``--mode tokens`` (the incident's
pattern); ``docs/faults.md`` has the same table in prose.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from chunkwatch_lab.agent import LLMConfig
from chunkwatch_lab.client import ChatResult, chat
from chunkwatch_lab.fault_gateway import FAULT_MODES, Gateway
from chunkwatch_lab.service import ServiceConfig, create_app
from chunkwatch_lab.serving import ServiceThread
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream, answer_tokens

PROMPT = "What did the gateway do?"
TOKENS = 12
NO_GENERATIONS = "No generations found in stream"

# mode -> (gateway params, what the user sees: "answer" | "partial" | error type, message part).
# Error types are what langchain-openai raises: it wraps the SDK's APIConnectionError,
# InternalServerError and BadRequestError in its own OpenAI* classes.
# what the client is told (chunkwatch.client_errors.public_message): never the exception's text
CONNECTION = "could not be reached or dropped the connection"
EXPECTED: dict[str, tuple[dict[str, Any], str, str]] = {
    "pass": ({}, "answer", ""),
    "zero": ({}, "ValueError", NO_GENERATIONS),
    "zero-abrupt": ({}, "OpenAIConnectionError", CONNECTION),
    "done-only": ({}, "ValueError", NO_GENERATIONS),
    "json": ({}, "ValueError", NO_GENERATIONS),
    "html": ({}, "ValueError", NO_GENERATIONS),
    "buffer": ({}, "answer", ""),
    "buffer-late": ({}, "answer", ""),
    "truncate": ({"events": 4}, "partial", ""),
    "truncate-abrupt": ({"events": 4}, "OpenAIConnectionError", CONNECTION),
    # AzureChatOpenAI has no timeouts: a stall lasts until the gateway drops it (`limit`)
    "stall": ({"limit": 1.0}, "OpenAIConnectionError", CONNECTION),
    "stall-headers": ({"limit": 1.0}, "OpenAIConnectionError", CONNECTION),
    "keepalive-only": ({"interval": 0.2, "limit": 1.0}, "ValueError", NO_GENERATIONS),
    "trickle": ({"bytes": 200, "delay": 0.01}, "answer", ""),
    "status": ({"status": 502}, "OpenAIAPIError", "HTTP 502"),
    "reject-stream-options": ({}, "OpenAIInvalidRequestError", "HTTP 400"),
    "malformed": ({}, "JSONDecodeError", ""),
    "no-blank-lines": ({}, "ValueError", NO_GENERATIONS),
    "error-event": ({"events": 4}, "APIError", ""),
    "gzip-stripped": ({}, "UnicodeDecodeError", ""),
    # Azure's prompt-filter results and [DONE]: the bare stack ends with an empty answer
    "filter-only": ({}, "empty", ""),
    # tokens, then {"message": ...}: langchain-openai skips the chunk, a cut answer
    "inband-error": ({"events": 4}, "partial", ""),
}


def test_every_gateway_mode_has_an_expectation() -> None:
    """The table covers exactly the gateway's fault modes."""
    assert set(EXPECTED) == set(FAULT_MODES)


@pytest.fixture(scope="module")
def system() -> Iterator[tuple[Running[Gateway], dict[str, ServiceThread]]]:
    with start_in_thread(Upstream(tokens=TOKENS, token_delay=0.005)) as up:
        with start_in_thread(Gateway(up.url)) as gw:
            services = {
                mode: ServiceThread(
                    create_app(
                        ServiceConfig(
                            llm=LLMConfig(url=gw.url), mode=mode, instrument=False, guard=False
                        )
                    )
                )
                for mode in ("tokens", "updates")
            }
            try:
                yield gw, services
            finally:
                for svc in services.values():
                    svc.stop()


def ask(
    system: tuple[Running[Gateway], dict[str, ServiceThread]], mode: str, fault: str, **params: Any
) -> ChatResult:
    gw, services = system
    gw.server.set_fault(fault, **params)
    return chat(services[mode].url, PROMPT, timeout=30)


@pytest.mark.parametrize("fault", FAULT_MODES)
def test_what_the_user_sees_in_tokens_mode(
    system: tuple[Running[Gateway], dict[str, ServiceThread]], fault: str
) -> None:
    """Per fault: the full answer, a partial answer, or `event: error` with the real exception.

    Whatever happens, the SSE body ends properly (never a cut chunked body).
    """
    params, seen, message = EXPECTED[fault]
    r = ask(system, "tokens", fault, **params)
    answer = "".join(answer_tokens(PROMPT, TOKENS))
    assert r.status == 200 and r.complete, "the body must always end properly"
    if seen == "answer":
        assert r.done and r.text == answer
    elif seen == "partial":
        assert r.done and r.text and answer.startswith(r.text) and r.text != answer
    elif seen == "empty":
        assert r.done and r.text == "" and r.error is None
    else:
        assert r.last_event == "error", [e.event for e in r.events]
        assert r.error is not None
        assert r.error["type"] == seen, r.error
        assert message in r.error["message"]


def test_zero_is_the_incident_and_updates_mode_is_its_fix(
    system: tuple[Running[Gateway], dict[str, ServiceThread]],
) -> None:
    """`zero`: tokens mode fails with langchain-core's exact error; updates mode answers."""
    broken = ask(system, "tokens", "zero")
    assert broken.error == {"type": "ValueError", "message": "No generations found in stream."}
    fixed = ask(system, "updates", "zero")
    assert fixed.done and fixed.text == "".join(answer_tokens(PROMPT, TOKENS))


def test_healthy_gateway_answers_in_both_modes(
    system: tuple[Running[Gateway], dict[str, ServiceThread]],
) -> None:
    """Through a healthy gateway both modes deliver the full answer."""
    for mode in ("tokens", "updates"):
        r = ask(system, mode, "pass")
        assert r.done and r.text == "".join(answer_tokens(PROMPT, TOKENS))


@pytest.mark.parametrize("fault", FAULT_MODES)
def test_updates_mode_answers_under_every_fault(
    system: tuple[Running[Gateway], dict[str, ServiceThread]], fault: str
) -> None:
    """Gateways break streaming only: non-streaming model calls (--mode updates) still answer."""
    params, _, _ = EXPECTED[fault]
    r = ask(system, "updates", fault, **params)
    assert r.done and r.text == "".join(answer_tokens(PROMPT, TOKENS))
