"""The guard's breaker end to end (its own module: instrumentation is process-global,
so no other instrumented system may be alive while it runs)."""

from __future__ import annotations

import time

from chunkwatch.guard import BreakerConfig, BreakerState, Guard
from chunkwatch_lab.upstream import answer_tokens

from .helpers import System, instrumented_system

PROMPT = "Is the stream healthy?"
ANSWER = "".join(answer_tokens(PROMPT, 12))


def chat_guard(system: System) -> Guard:
    guard = system.service.app.extensions["chunkwatch.chat"].guard
    assert guard is not None
    return guard


def test_breaker_walks_closed_open_half_open_closed() -> None:
    """End to end with runtime gateway switching: N failures open the breaker; requests
    then start in updates mode without a streaming attempt; after the cool-down one
    request probes streaming; success closes the breaker."""
    breaker = BreakerConfig(failures=2, window=60, cooldown=1.0)
    with instrumented_system(token_delay=0.005, guard=True, breaker=breaker) as system:
        guard = chat_guard(system)

        def transitions(to: str) -> float:
            return system.sample("chunkwatch_breaker_transitions_total", upstream="test-gw", to=to)

        for _ in range(2):
            assert system.ask(PROMPT, "zero").named("mode")[0]["reason"] == "empty@gateway"
        assert guard.state("test-gw") is BreakerState.OPEN
        assert transitions("open") == 1
        assert system.sample("chunkwatch_stream_mode", upstream="test-gw", mode="updates") == 1
        assert system.sample("chunkwatch_stream_mode", upstream="test-gw", mode="tokens") == 0

        # open: no streaming attempt at all
        system.gateway.server.reset_stats()
        r = system.ask(PROMPT, "zero")
        assert r.done and r.text == ANSWER
        assert r.named("mode")[0]["reason"].startswith("breaker_open")
        assert system.gateway.server.stats()["stream_requests"] == 0

        # heal; after the cool-down one request probes token streaming and closes it
        time.sleep(1.1)
        r = system.ask(PROMPT, "pass")
        assert r.done and r.named("mode") == [] and r.named("token")
        assert transitions("half_open") == 1 and transitions("closed") == 1
        assert guard.state("test-gw") is BreakerState.CLOSED
        assert system.sample("chunkwatch_stream_mode", upstream="test-gw", mode="tokens") == 1
        assert system.sample("chunkwatch_stream_mode", upstream="test-gw", mode="updates") == 0


def test_a_slow_non_streaming_answer_is_not_a_stall() -> None:
    """The first-chunk deadline is for streams: a buffered answer slower than it (the
    guard's own fallback call, here 1.5 s against a 1 s deadline) is not aborted."""
    with instrumented_system(
        tokens=12, token_delay=0.125, guard=True, breaker=BreakerConfig(failures=1000)
    ) as system:
        r = system.ask(PROMPT, "zero")
        assert r.done and r.text == ANSWER, [e.event for e in r.events]
        assert (
            system.sample(
                "chunkwatch_stalls_total", layer="sdk", kind="first_chunk", upstream="test-gw"
            )
            == 0
        )


def test_one_users_filtered_prompts_do_not_fall_back_or_open_the_breaker() -> None:
    """Azure's HTTP 400 content_filter refuses one user's prompt, not the stream: it is not
    re-sent without streaming (one upstream call), does not count toward the breaker, and
    after more such prompts than the breaker's threshold other users still stream tokens."""
    breaker = BreakerConfig(failures=2, window=60, cooldown=60)
    with instrumented_system(token_delay=0.005, guard=True, breaker=breaker) as system:
        guard = chat_guard(system)
        upstream = system.upstream.server
        for _ in range(4):
            before = upstream.stats["requests"]
            r = system.ask("tell me [[filtered]] things", "pass")
            assert r.named("error") and not r.named("mode") and not r.done
            assert upstream.stats["requests"] - before == 1  # no buffered re-send
        assert guard.state("test-gw") is BreakerState.CLOSED
        assert system.sample("chunkwatch_fallbacks_total", upstream="test-gw") == 0
        r = system.ask(PROMPT, "pass")
        assert r.done and r.text == ANSWER and r.named("token") and not r.named("mode")


def test_a_fallback_that_fails_too_does_not_count_toward_the_breaker() -> None:
    """A stream-shape 400 whose buffered re-send fails as well says nothing about streaming
    through this upstream: the breaker counts only fallbacks that worked."""
    breaker = BreakerConfig(failures=2, window=60, cooldown=60)
    with instrumented_system(token_delay=0.005, guard=True, breaker=breaker) as system:
        guard = chat_guard(system)
        # the gateway answers 400 to streams only; the upstream then refuses the prompt
        for _ in range(3):
            r = system.ask("again [[filtered]]", "status", status=400)
            assert r.named("error") and not r.done
        assert guard.state("test-gw") is BreakerState.CLOSED
        for _ in range(2):  # a real stream-only 400: the fallback works and is counted
            r = system.ask(PROMPT, "status", status=400)
            assert r.done and r.text == ANSWER
        assert guard.state("test-gw") is BreakerState.OPEN
