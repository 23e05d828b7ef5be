"""Stream tokens, the bounded map of recent streams and the rate limit: the state the beacon
endpoint trusts, driven with their own clocks."""

from __future__ import annotations

import threading

import pytest

from chunkwatch.browser_token import (
    TOKEN_LIFETIME,
    RateLimit,
    RecentStreams,
    StreamRecord,
    TokenError,
    Tokens,
)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(expiry: int, events: int = 3) -> StreamRecord:
    return StreamRecord(
        expiry=expiry,
        events=events,
        first_ms=1.0,
        last_ms=2.0,
        terminal=True,
        parent=None,
        upstream="none",
        funnel={"sse": events},
    )


def reason(tokens: Tokens, token: object) -> str:
    with pytest.raises(TokenError) as err:
        tokens.verify(token)
    return err.value.reason


def test_a_token_verifies_with_its_secret_and_is_short() -> None:
    """A token is v2.<id>.<expiry>.<mac>, under 256 characters (the contract's bound), and
    verifies to its id; its expiry is now + the lifetime."""
    clock = Clock()
    tokens = Tokens(b"s" * 32, clock=clock)
    token, ident, expiry = tokens.issue()
    assert len(token) < 256 and token.startswith("v2.")
    assert token.split(".")[1] == ident and expiry == int(clock.now) + TOKEN_LIFETIME
    assert tokens.verify(token) == ident
    assert tokens.issue()[1] != ident  # random ids


def test_forged_tampered_and_foreign_tokens_are_refused() -> None:
    """Another secret's token, a changed id, a changed expiry (to live longer), a changed
    MAC, garbage, non-strings and overlong strings are all `forged`."""
    tokens = Tokens(b"a" * 32)
    token = Tokens(b"b" * 32).issue()[0]
    assert reason(tokens, token) == "forged"
    mine = tokens.issue()[0]
    v, ident, expiry, mac = mine.split(".")
    other = "B" if ident[0] == "A" else "A"  # one character changed, whatever it was
    assert reason(tokens, f"{v}.{other}{ident[1:]}.{expiry}.{mac}") == "forged"
    assert reason(tokens, f"{v}.{ident}.{int(expiry) + 3600}.{mac}") == "forged"
    changed = "B" if mac[0] == "A" else "A"
    assert reason(tokens, f"{v}.{ident}.{expiry}.{changed}{mac[1:]}") == "forged"
    assert reason(tokens, f"v1.{ident}.{expiry}.{mac}") == "forged"  # another version
    for bad in ("", "v2...", "x" * 300, mine + "." + mac, 42, None, ["v2"], "v2.é.1.x"):
        assert reason(tokens, bad) == "forged"


def test_a_token_expires_after_its_lifetime() -> None:
    """Valid until its expiry second, `expired` after it."""
    clock = Clock()
    tokens = Tokens(b"k" * 32, clock=clock)
    token = tokens.issue()[0]
    clock.now += TOKEN_LIFETIME
    assert tokens.verify(token)
    clock.now += 1.5
    assert reason(tokens, token) == "expired"


def test_the_secret_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes (two Tokens) with one CHUNKWATCH_BEACON_SECRET accept each other's
    tokens; without it each has its own random secret."""
    monkeypatch.setenv("CHUNKWATCH_BEACON_SECRET", "shared by the replicas")
    assert Tokens().verify(Tokens().issue()[0])
    monkeypatch.delenv("CHUNKWATCH_BEACON_SECRET")
    assert reason(Tokens(), Tokens().issue()[0]) == "forged"


def test_recent_streams_are_bounded_oldest_first() -> None:
    """At most max records: the oldest goes first; a record is claimed once."""
    clock = Clock()
    streams = RecentStreams(3, clock=clock)
    for i in range(5):
        streams.add(f"id{i}", record(int(clock.now) + 600, i))
    assert len(streams) == 3
    assert streams.get("id0") is None and streams.get("id1") is None
    got = streams.get("id4")
    assert got is not None and got.events == 4
    first = streams.claim("id4", {})
    assert first[0] is got and first[1] is True
    assert streams.claim("id4", {}) == (got, False)
    assert streams.claim("nope", {}) == (None, False)


def test_recent_streams_forget_what_expired() -> None:
    """A record is gone with its token's lifetime, read or not."""
    clock = Clock()
    streams = RecentStreams(clock=clock)
    streams.add("old", record(int(clock.now) + 10))
    clock.now += 11
    assert streams.get("old") is None and streams.claim("old", {}) == (None, False)
    streams.add("new", record(int(clock.now) + 10))
    assert len(streams) == 1  # the expired one was dropped on the insert


def test_recent_streams_are_thread_safe() -> None:
    """Eight threads adding 2 000 records each and claiming them: the bound holds, and each
    record is claimed exactly once across threads."""
    streams = RecentStreams(1000)
    expiry = 2**40
    wins: list[int] = []

    def work(n: int) -> None:
        for i in range(2000):
            streams.add(f"{n}-{i}", record(expiry))
        won = 0
        for m in range(8):
            for i in range(1990, 2000):
                won += streams.claim(f"{m}-{i}", {})[1]
        wins.append(won)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(streams) == 1000
    claimed = sum(wins)
    assert 0 < claimed <= 80
    assert (
        sum(1 for m in range(8) for i in range(1990, 2000) if streams.claim(f"{m}-{i}", {})[0])
        <= 80
    )


def test_the_rate_limit_is_a_token_bucket() -> None:
    """A burst of `burst`, then `rate` per second."""
    t = [0.0]
    bucket = RateLimit(10, 5, clock=lambda: t[0])
    assert [bucket.allow() for _ in range(6)] == [True] * 5 + [False]
    t[0] += 0.25  # 2.5 tokens
    assert [bucket.allow() for _ in range(3)] == [True, True, False]


def test_a_beacon_before_the_stream_finished_is_parked_for_its_end() -> None:
    """A hop cut the stream: the browser's beacon beats the service's own end of it. The
    open record takes the claim and parks the beacon; finish hands it back once, and a
    second beacon is still a replay."""
    streams = RecentStreams()
    streams.add("s", StreamRecord(expiry=2**40))
    opened, first = streams.claim("s", {"events": 3})
    assert first and opened is not None and opened.early == {"events": 3}
    done = record(2**40, 13)
    assert streams.finish("s", done) == {"events": 3}
    assert streams.get("s") is done and done.finished and done.early is None
    assert streams.claim("s", {}) == (done, False)
    # A stream finished with no beacon yet: nothing handed back; the beacon then claims it.
    streams.add("t", StreamRecord(expiry=2**40))
    assert streams.finish("t", record(2**40)) is None
    got, first = streams.claim("t", {})
    assert first and got is not None and got.early is None
