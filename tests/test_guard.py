"""The guard: broken token streams fall back to state streaming, per call and per upstream.

Real parts: local upstream, fault gateway switched at runtime, the instrumented
reference service with the guard on, Flask, LangGraph, the openai SDK.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from chunkwatch import semconv as sc
from chunkwatch.guard import BreakerConfig, BreakerState, Guard
from chunkwatch_lab.upstream import answer_tokens

from .helpers import System, instrumented_system

PROMPT = "Is the stream healthy?"
ANSWER = "".join(answer_tokens(PROMPT, 12))


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    """Guard on; a breaker that never opens here (the breaker has its own tests)."""
    with instrumented_system(
        token_delay=0.01, guard=True, breaker=BreakerConfig(failures=1000)
    ) as sys_:
        yield sys_


def chat_guard(system: System) -> Guard:
    guard = system.service.app.extensions["chunkwatch.chat"].guard
    assert guard is not None
    return guard


@pytest.mark.parametrize(
    ("fault", "params", "reason"),
    [
        ("zero", {}, "empty@gateway"),
        ("json", {}, "wrong_content_type@gateway"),
        ("html", {}, "wrong_content_type@gateway"),
        ("stall", {"limit": 5.0}, "stalled@gateway"),
        ("reject-stream-options", {}, "http_error@gateway"),
    ],
)
def test_user_gets_the_answer_and_the_switch_is_announced(
    system: System, fault: str, params: dict[str, Any], reason: str
) -> None:
    """The broken streaming call is re-issued without streaming; the client is told."""
    before = system.sample("chunkwatch_fallbacks_total", upstream="test-gw", reason=reason)
    r = system.ask(PROMPT, fault, **params)
    assert r.done, [e.event for e in r.events]
    assert r.named("mode") == [{"mode": "updates", "reason": reason}]
    assert [e.event for e in r.events] == ["mode", "update", "done"]
    assert r.text == ANSWER
    assert system.sample("chunkwatch_fallbacks_total", upstream="test-gw", reason=reason) == (
        before + 1
    )


def test_healing_does_not_hide_the_fault(system: System) -> None:
    """A healed request still counts the empty gateway stream and keeps the verdict."""
    before = system.sample(
        "chunkwatch_streams_total", layer="gateway", outcome="empty", upstream="test-gw"
    )
    r = system.ask(PROMPT, "zero")
    assert r.done
    attrs = system.root().attributes or {}
    assert attrs[sc.A_VERDICT] == "empty@gateway"
    assert (
        system.sample(
            "chunkwatch_streams_total", layer="gateway", outcome="empty", upstream="test-gw"
        )
        == before + 1
    )


def test_failed_attempt_and_fallback_are_siblings_with_the_reason(system: System) -> None:
    """Under the agent span: the failed streaming `chat` span and the fallback `chat` span."""
    system.ask(PROMPT, "zero")
    layers = system.by_layer()
    (agent,) = layers["langgraph"]
    failed, fallback = sorted(layers["sdk"], key=lambda s: s.start_time or 0)
    assert failed.parent is not None and fallback.parent is not None
    assert failed.parent.span_id == fallback.parent.span_id == agent.context.span_id
    assert (failed.attributes or {})[sc.GEN_AI_REQUEST_STREAM] is True
    assert (failed.attributes or {})[sc.A_OUTCOME] == "empty"
    assert (fallback.attributes or {})[sc.GEN_AI_REQUEST_STREAM] is False
    assert (fallback.attributes or {})[sc.A_FALLBACK_REASON] == "empty@gateway"
    assert [e.name for e in agent.events] == [sc.EVENT_FALLBACK]


def test_never_reissued_after_tokens_reached_the_client(system: System) -> None:
    """truncate / truncate-abrupt after tokens: no fallback, tokens then a clear error."""
    for fault in ("truncate", "truncate-abrupt"):
        before = sum(
            system.sample("chunkwatch_fallbacks_total", upstream="test-gw", reason=r)
            for r in ("truncated@gateway", "empty@gateway")
        )
        r = system.ask(PROMPT, fault, events=4)
        assert r.named("mode") == []
        assert r.named("token"), fault
        assert r.last_event == "error" and r.error is not None
        assert (r.error["layer"], r.error["outcome"]) == ("gateway", "truncated"), r.error
        assert ANSWER.startswith(r.text) and r.text != ANSWER
        after = sum(
            system.sample("chunkwatch_fallbacks_total", upstream="test-gw", reason=r)
            for r in ("truncated@gateway", "empty@gateway")
        )
        assert after == before, fault


def test_only_the_failed_model_call_is_repeated_in_a_tool_graph(system: System) -> None:
    """model -> tools -> model under `zero`: one fallback, the tool runs exactly once,
    the second model call goes out without streaming at all."""
    system.gateway.server.reset_stats()
    system.upstream.server.reset_stats()
    r = system.ask("please [[tool]] look it up", "zero")
    assert r.done
    assert [u["node"] for u in r.named("update")] == ["model", "tools", "model"]
    assert len(r.named("mode")) == 1
    stats = system.upstream.server.stats
    # zero answers stream requests itself; only the two non-stream calls reach the model
    assert stats["stream_requests"] == 0 and stats["non_stream_requests"] == 2
    assert system.gateway.server.stats()["stream_requests"] == 1


def test_healthy_requests_are_untouched(system: System) -> None:
    """A healthy gateway: token events, no mode event, no fallback."""
    r = system.ask(PROMPT, "pass")
    assert r.done and r.named("mode") == [] and r.text == ANSWER
    assert {e.event for e in r.events} == {"token", "done"}


def test_a_failed_probe_reopens_the_breaker() -> None:
    """Half-open and the gateway still broken: the probe falls back and the breaker re-opens."""
    clock = [0.0]
    guard = Guard(BreakerConfig(failures=1, window=10, cooldown=5), clock=lambda: clock[0])
    guard.failed("u", "empty@gateway")
    assert guard.state("u") is BreakerState.OPEN
    assert guard.start("u") == ("updates", False)
    clock[0] = 6.0
    assert guard.start("u") == ("tokens", True)  # the probe
    assert guard.start("u") == ("updates", False)  # everyone else waits for it
    guard.failed("u", "empty@gateway")
    assert guard.state("u") is BreakerState.OPEN
    clock[0] = 10.0
    assert guard.start("u") == ("updates", False)  # a new cool-down from the failed probe
    clock[0] = 11.5
    assert guard.start("u") == ("tokens", True)
    guard.succeeded("u")
    assert guard.state("u") is BreakerState.CLOSED


def test_failures_outside_the_window_do_not_open_the_breaker() -> None:
    """N failures must fall within W seconds."""
    clock = [0.0]
    guard = Guard(BreakerConfig(failures=2, window=10, cooldown=5), clock=lambda: clock[0])
    guard.failed("u", "empty@gateway")
    clock[0] = 11.0
    guard.failed("u", "empty@gateway")
    assert guard.state("u") is BreakerState.CLOSED
    clock[0] = 12.0
    guard.failed("u", "empty@gateway")
    assert guard.state("u") is BreakerState.OPEN


def test_breaker_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """N, W, T come from CHUNKWATCH_BREAKER_FAILURES / _WINDOW / _COOLDOWN."""
    monkeypatch.setenv("CHUNKWATCH_BREAKER_FAILURES", "7")
    monkeypatch.setenv("CHUNKWATCH_BREAKER_WINDOW", "120")
    monkeypatch.setenv("CHUNKWATCH_BREAKER_COOLDOWN", "15")
    assert BreakerConfig.from_env() == BreakerConfig(failures=7, window=120.0, cooldown=15.0)
    assert BreakerConfig() == BreakerConfig(failures=3, window=60.0, cooldown=30.0)
