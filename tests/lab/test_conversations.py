"""Conversation memory of the reference service: bounded, private, and a long one keeps working.

Real Flask on loopback, real LangGraph and its ``InMemorySaver``, the real openai SDK
against the local upstream. What the service holds is read from the saver, on the agent
loop (the only thread that touches it).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver

from chunkwatch_lab.agent import LLMConfig
from chunkwatch_lab.client import ChatResult, chat
from chunkwatch_lab.conversations import ConversationLimits, messages_to_drop
from chunkwatch_lab.service import ChatService, ServiceConfig, create_app
from chunkwatch_lab.serving import ServiceThread
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream, answer_tokens

T = TypeVar("T")


@pytest.fixture(scope="module")
def upstream() -> Iterator[Running[Upstream]]:
    running = start_in_thread(Upstream(tokens=8, token_delay=0.002))
    yield running
    running.stop()


@contextmanager
def service(upstream: Running[Upstream], **kw: Any) -> Iterator[ServiceThread]:
    config = ServiceConfig(llm=LLMConfig(url=upstream.url), instrument=False, **kw)
    svc = ServiceThread(create_app(config))
    try:
        yield svc
    finally:
        svc.stop()


def agent(svc: ServiceThread) -> ChatService:
    chat_service: ChatService = svc.app.extensions["chunkwatch.chat"]
    return chat_service


def on_loop(svc: ServiceThread, fn: Callable[[], T]) -> T:
    """``fn()`` on the agent loop, after what was queued there (deletions) has run."""

    async def call() -> T:
        await asyncio.sleep(0)
        return fn()

    return agent(svc).loop.submit(call()).result(5)


def saver(svc: ServiceThread) -> Any:
    return agent(svc).graphs["tokens"].checkpointer


def threads_held(svc: ServiceThread) -> set[str]:
    """The thread ids the saver holds checkpoints of."""
    return on_loop(svc, lambda: {t for t, ns in saver(svc).storage.items() if any(ns.values())})


def stored(svc: ServiceThread, thread_id: str) -> tuple[int, int]:
    """(checkpoints, bytes) the saver holds for ``thread_id``."""

    def measure() -> tuple[int, int]:
        s = saver(svc)
        spaces = s.storage.get(thread_id, {}).values()
        count = sum(len(cps) for cps in spaces)
        size = sum(len(c[1]) + len(m[1]) for cps in spaces for c, m, _ in cps.values())
        size += sum(len(v[1]) for k, v in s.blobs.items() if k[0] == thread_id)
        writes = [w for k, ws in s.writes.items() if k[0] == thread_id for w in ws.values()]
        return count, size + sum(len(w[2][1]) for w in writes)

    return on_loop(svc, measure)


def history(svc: ServiceThread, thread_id: str) -> list[Any]:
    graph = agent(svc).graphs["tokens"]
    config = {"configurable": {"thread_id": thread_id}}
    state = agent(svc).loop.submit(graph.aget_state(config)).result(5)
    return list(state.values.get("messages", []))


def start(svc: ServiceThread, message: str) -> str:
    r = chat(svc.url, message, timeout=30)
    assert r.done and r.error is None, r.events
    thread_id: str = r.named("done")[0]["thread_id"]
    return thread_id


def refused(r: ChatResult) -> bool:
    """A JSON 404 `unknown_thread`, not a stream."""
    if r.status != 404 or not r.content_type.startswith("application/json"):
        return False
    return bool(json.loads(r.body)["error"]["type"] == "unknown_thread")


def answer(prompt: str) -> str:
    return "".join(answer_tokens(prompt, 8))


def test_many_new_conversations_stay_within_the_cap(upstream: Running[Upstream]) -> None:
    """24 new conversations from 6 client threads at once, with room for 5: every one is
    answered, the service holds at most 5 afterwards, and the evicted ones are refused."""
    with service(upstream, conversations=ConversationLimits(max_conversations=5)) as svc:
        with ThreadPoolExecutor(6) as pool:
            ids = list(pool.map(lambda i: start(svc, f"hello {i}"), range(24)))
        assert len(set(ids)) == 24
        held = threads_held(svc)
        assert len(held) <= 5 and len(agent(svc).conversations) <= 5
        gone = [t for t in ids if t not in held]
        assert len(gone) >= 19
        assert all(refused(chat(svc.url, "still there?", thread_id=t)) for t in gone[:3])


def test_an_idle_conversation_expires(upstream: Running[Upstream]) -> None:
    """Idle past the TTL, a conversation is forgotten without any further request (the
    saver lets it go), and continuing it is a JSON 404; within the TTL it continues."""
    limits = ConversationLimits(idle_ttl=0.5)
    with service(upstream, conversations=limits) as svc:
        thread_id = start(svc, "remember me")
        assert chat(svc.url, "still here", thread_id=thread_id).done
        deadline = time.monotonic() + 5
        while thread_id in threads_held(svc) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert thread_id not in threads_held(svc)
        assert refused(chat(svc.url, "and now?", thread_id=thread_id))


def test_the_least_recently_used_conversation_is_evicted(upstream: Running[Upstream]) -> None:
    """With room for 3: A, B, C, then A again, then D: B (the least recently used) goes,
    A keeps its whole history, C and D continue."""
    with service(upstream, conversations=ConversationLimits(max_conversations=3)) as svc:
        a, b, c = (start(svc, f"I am {n}") for n in "ABC")
        assert chat(svc.url, "A again", thread_id=a).done
        d = start(svc, "I am D")
        assert refused(chat(svc.url, "B again", thread_id=b))
        assert threads_held(svc) == {a, c, d}
        assert chat(svc.url, "A once more", thread_id=a).done
        said = [m.text for m in history(svc, a) if isinstance(m, HumanMessage)]
        assert said == ["I am A", "A again", "A once more"]
        assert chat(svc.url, "C again", thread_id=c).done
        assert chat(svc.url, "D again", thread_id=d).done


def test_a_long_conversation_with_large_messages_keeps_working(
    upstream: Running[Upstream],
) -> None:
    """50 turns of 30,000-character messages on one thread (the old service failed from
    turn 35 on: the whole history outgrew the model endpoint's 1 MiB body limit, and every
    later turn failed too). With the default limits every turn is answered, the thread
    holds one checkpoint, and what it stores stops growing."""
    limits = ConversationLimits()
    with service(upstream, conversations=limits) as svc:
        thread_id, sizes = None, []
        for turn in range(50):
            message = f"turn {turn}: " + "lorem ipsum " * 2_500
            r = chat(svc.url, message, thread_id=thread_id, timeout=30)
            assert r.done and r.text == answer(message), (turn, r.error)
            thread_id = r.named("done")[0]["thread_id"]
            checkpoints, size = stored(svc, thread_id)
            assert checkpoints == 1
            sizes.append(size)
        assert max(sizes) < 3 * limits.history_chars
        assert max(sizes[10:]) < 1.05 * max(sizes[:10])  # flat, not growing with each turn
        kept = history(svc, thread_id)
        assert isinstance(kept[0], HumanMessage) and len(kept) <= limits.history_messages


def test_a_thread_id_the_service_did_not_issue_is_refused(upstream: Running[Upstream]) -> None:
    """A client-chosen id, a guessed id of the issued shape, a 128-character one: JSON 404
    `unknown_thread`, and the service starts no conversation for them."""
    with service(upstream) as svc:
        mine = start(svc, "my secret plan")
        for guess in ("t1", secrets.token_urlsafe(24), "x" * 128, mine[:-1]):
            r = chat(svc.url, "what did they say?", thread_id=guess)
            assert refused(r), (guess, r.status, r.body)
        assert threads_held(svc) == {mine}


def test_a_continued_thread_sees_its_history_from_one_checkpoint(
    upstream: Running[Upstream],
) -> None:
    """Continued with its issued id, a conversation has its whole history (a tool round
    trip included) and nobody else's; the saver keeps one checkpoint of it, not one per step."""
    with service(upstream) as svc:
        other = start(svc, "someone else")
        mine = start(svc, "please [[tool]] look this up")
        r = chat(svc.url, "and then?", thread_id=mine)
        assert r.done and r.named("done")[0]["thread_id"] == mine
        kinds = [type(m).__name__[0] for m in history(svc, mine)]  # Human, AI, Tool
        assert kinds == ["H", "A", "T", "A", "H", "A"]
        assert history(svc, mine)[-1].text == answer("and then?")
        assert [m.text for m in history(svc, other)] == ["someone else", answer("someone else")]
        assert stored(svc, mine)[0] == 1


def test_turns_of_one_conversation_run_one_at_a_time(upstream: Running[Upstream]) -> None:
    """Four turns sent at once on one thread are all answered and all kept, in some order:
    none is lost to another that read the same checkpoint."""
    with service(upstream) as svc:
        thread_id = start(svc, "first")
        with ThreadPoolExecutor(4) as pool:
            results = list(
                pool.map(lambda i: chat(svc.url, f"at once {i}", thread_id=thread_id), range(4))
            )
        assert all(r.done for r in results)
        said = [m.text for m in history(svc, thread_id) if isinstance(m, HumanMessage)]
        assert said[0] == "first" and sorted(said[1:]) == [f"at once {i}" for i in range(4)]


def test_a_checkpointer_of_yours_keeps_what_it_holds(upstream: Running[Upstream]) -> None:
    """With `ServiceConfig(checkpointer=...)` retention is the operator's: past the cap
    nothing is evicted; ids are still issued, and one the checkpointer lacks is refused."""
    limits = ConversationLimits(max_conversations=1)
    with service(upstream, conversations=limits, checkpointer=InMemorySaver()) as svc:
        first, second = start(svc, "one"), start(svc, "two")
        assert chat(svc.url, "one more", thread_id=first).done
        assert chat(svc.url, "two more", thread_id=second).done
        assert refused(chat(svc.url, "guess", thread_id=secrets.token_urlsafe(24)))
        assert len(history(svc, first)) == 4


# -- pure parts -------------------------------------------------------------------------------


def test_whole_old_turns_go_past_the_budget_and_the_new_message_stays() -> None:
    """Oldest whole turns go first, until the rest fits; a new message over the budget on
    its own is still sent, alone."""
    limits = ConversationLimits(history_messages=5, history_chars=100)
    turns = [[HumanMessage(f"q{i}", id=f"h{i}"), AIMessage(f"a{i}", id=f"a{i}")] for i in range(4)]
    past = [m for t in turns for m in t]
    assert [m.id for m in messages_to_drop(past, HumanMessage("q4"), limits)] == [
        "h0",
        "a0",
        "h1",
        "a1",
    ]
    assert len(messages_to_drop(past, HumanMessage("x" * 101), limits)) == 8


def test_tool_calls_a_cut_run_left_unanswered_are_dropped() -> None:
    """An assistant tool call without its tool answer (the run was cancelled between the
    two nodes) would make every later model call a 400: it goes."""
    limits = ConversationLimits()
    call = {"id": "c1", "name": "lookup", "args": {"query": "q"}}
    done = {"id": "c0", "name": "lookup", "args": {"query": "q"}}
    past = [
        HumanMessage("q0", id="h0"),
        AIMessage("", tool_calls=[done], id="a0"),
        ToolMessage("r", tool_call_id="c0", id="t0"),
        AIMessage("answer", id="a0b"),
        HumanMessage("q1", id="h1"),
        AIMessage("", tool_calls=[call], id="a1"),
    ]
    assert [m.id for m in messages_to_drop(past, HumanMessage("q2"), limits)] == ["a1"]


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("CHUNKWATCH_MAX_CONVERSATIONS", "many"),
        ("CHUNKWATCH_MAX_CONVERSATIONS", "0"),
        ("CHUNKWATCH_CONVERSATION_TTL", "-1"),
        ("CHUNKWATCH_CONVERSATION_TTL", "inf"),
        ("CHUNKWATCH_HISTORY_MESSAGES", "2.5"),
        ("CHUNKWATCH_HISTORY_CHARS", "1e3"),
    ],
)
def test_a_malformed_limit_names_its_variable(name: str, raw: str) -> None:
    """A bad value stops the service at start, with the variable's name in the error."""
    with pytest.raises(ValueError, match=name):
        ConversationLimits.from_env({name: raw})


def test_limits_come_from_the_environment() -> None:
    """Each variable sets its limit; unset or empty ones keep the defaults."""
    env = {
        "CHUNKWATCH_MAX_CONVERSATIONS": "20",
        "CHUNKWATCH_CONVERSATION_TTL": "0",
        "CHUNKWATCH_HISTORY_MESSAGES": " 12 ",
        "CHUNKWATCH_HISTORY_CHARS": "",
    }
    assert ConversationLimits.from_env(env) == ConversationLimits(20, 0.0, 12, 64_000)
    assert ConversationLimits.from_env({}) == ConversationLimits()
