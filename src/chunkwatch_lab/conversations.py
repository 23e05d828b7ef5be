"""Conversation memory of the reference service: bounded, and private to whoever holds the id.

By default conversations live in this process, in a :class:`LatestCheckpointSaver`
(an ``InMemorySaver`` keeping a thread's latest checkpoint only, once a turn ends), and
:class:`Conversations` bounds them: at most ``max_conversations`` (a new one evicts the
least recently used idle one); forgotten after ``idle_ttl`` seconds idle (checked on
requests and by a sweep on the agent loop); and before each turn the oldest whole turns
of the history are removed past ``history_messages`` / ``history_chars`` (the newest
message always stays), so a long conversation keeps working instead of outgrowing the
model's or the gateway's limit.

Thread ids are issued by the service (``secrets.token_urlsafe(24)``) and only those may
be continued: any other, or a forgotten one, is :class:`UnknownThread` (a 404). A new
conversation whose first turn fails is forgotten at once (its client never got the id),
so an outage does not evict the conversations that work.

With a checkpointer of yours (``ServiceConfig(checkpointer=AsyncPostgresSaver(...))``)
retention is yours: nothing is evicted, expired or pruned; a thread may be continued if
the checkpointer holds it. The history budget applies either way.

Configuration (``ConversationLimits.from_env``; a bad value is a ValueError naming it):

* ``CHUNKWATCH_MAX_CONVERSATIONS`` — conversations kept in memory (1000).
* ``CHUNKWATCH_CONVERSATION_TTL`` — seconds idle before one is forgotten (1800; 0: never).
* ``CHUNKWATCH_HISTORY_MESSAGES`` — messages kept per conversation (50).
* ``CHUNKWATCH_HISTORY_CHARS`` — characters kept per conversation (64000).

Thread safety: the registry is guarded by a lock (requests arrive on many WSGI
threads); the saver is only touched on the agent loop, where the graphs use it too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, RemoveMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver

__all__ = [
    "UNKNOWN_THREAD",
    "ConversationLimits",
    "Conversations",
    "LatestCheckpointSaver",
    "UnknownThread",
    "messages_to_drop",
]

log = logging.getLogger("chunkwatch.service")

UNKNOWN_THREAD = (
    "`thread_id` names no conversation of this service: thread ids are issued by the "
    "service (in `event: done`), and a conversation is forgotten when idle too long or "
    "when newer ones need the room. Send no `thread_id` to start a new conversation."
)
LOOKUP_TIMEOUT = 10.0  # seconds to ask a checkpointer of yours whether it holds a thread
ISSUED_GRACE = 60.0  # seconds an issued id may wait for its first turn to start

Submit = Callable[[Coroutine[Any, Any, Any]], Any]  # AgentLoop.submit


@dataclass(frozen=True)
class ConversationLimits:
    """How much conversation memory the service keeps (see the module docstring)."""

    max_conversations: int = 1000
    idle_ttl: float = 1800.0  # seconds; 0: no idle expiry (the cap still holds)
    history_messages: int = 50
    history_chars: int = 64_000

    def __post_init__(self) -> None:
        for name in ("max_conversations", "history_messages", "history_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ConversationLimits.{name}={value!r}: expected an integer >= 1")
        ttl = self.idle_ttl
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 <= ttl < math.inf:
            raise ValueError(f"ConversationLimits.idle_ttl={ttl!r}: expected seconds >= 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ConversationLimits:
        """The limits the ``CHUNKWATCH_*`` variables set; the defaults for those unset."""
        env = os.environ if environ is None else environ
        return cls(
            max_conversations=_env_int(env, "CHUNKWATCH_MAX_CONVERSATIONS", cls.max_conversations),
            idle_ttl=_env_seconds(env, "CHUNKWATCH_CONVERSATION_TTL", cls.idle_ttl),
            history_messages=_env_int(env, "CHUNKWATCH_HISTORY_MESSAGES", cls.history_messages),
            history_chars=_env_int(env, "CHUNKWATCH_HISTORY_CHARS", cls.history_chars),
        )


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdecimal() or int(raw) < 1:
        raise ValueError(f"{name}={raw!r}: expected a whole number >= 1")
    return int(raw)


def _env_seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds >= 0 (0: never)")
    return value


class UnknownThread(LookupError):
    """A thread id the service did not issue, or one it has forgotten (idle, evicted)."""

    def __init__(self, thread_id: str) -> None:
        super().__init__(UNKNOWN_THREAD)
        self.thread_id = thread_id


# -- the history budget (pure) ----------------------------------------------------------------


def _chars(msg: BaseMessage) -> int:
    calls = msg.tool_calls if isinstance(msg, AIMessage) else []
    return len(msg.text) + sum(len(str(c.get("args"))) for c in calls)


def messages_to_drop(
    history: Sequence[BaseMessage], incoming: BaseMessage, limits: ConversationLimits
) -> list[BaseMessage]:
    """What to remove from ``history`` before ``incoming`` (the new user message) joins it.

    Whole turns (a user message and what answered it) go, oldest first, until the rest
    and ``incoming`` fit ``history_messages`` and ``history_chars``; ``incoming`` stays even
    alone over the budget. Tool calls left unanswered by a run cut short go too (with any
    answers they got): a model API refuses a history holding one, at every later turn.
    """
    answered = {m.tool_call_id for m in history if isinstance(m, ToolMessage)}
    cut_calls: set[str | None] = set()
    drop: list[BaseMessage] = []
    turns: list[list[BaseMessage]] = []
    for msg in history:
        if isinstance(msg, AIMessage) and any(c.get("id") not in answered for c in msg.tool_calls):
            cut_calls.update(c.get("id") for c in msg.tool_calls)
            drop.append(msg)
        elif isinstance(msg, ToolMessage) and msg.tool_call_id in cut_calls:
            drop.append(msg)
        elif isinstance(msg, HumanMessage) or not turns:
            turns.append([msg])
        else:
            turns[-1].append(msg)
    count, chars = 1, _chars(incoming)
    for i in range(len(turns) - 1, -1, -1):
        count += len(turns[i])
        chars += sum(_chars(m) for m in turns[i])
        if count > limits.history_messages or chars > limits.history_chars:
            drop.extend(m for turn in turns[: i + 1] for m in turn)
            break
    return drop


# -- the in-memory saver ----------------------------------------------------------------------


class LatestCheckpointSaver(InMemorySaver):
    """``InMemorySaver`` with :meth:`prune`: ``InMemorySaver`` keeps every checkpoint of
    every step, each with the whole message list, so a thread grows with the square of
    its length. Call it on the loop that runs the graphs (it is not thread-safe)."""

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``keep_latest``: each thread keeps its latest checkpoint (now a root), that
        checkpoint's channel values and pending writes; ``delete``: the threads go."""
        if strategy not in ("keep_latest", "delete"):
            raise ValueError(f"unknown prune strategy {strategy!r}")
        for thread_id in thread_ids:
            if strategy == "delete":
                self.delete_thread(thread_id)
                continue
            keep_blobs: set[tuple[Any, ...]] = set()
            keep_writes: set[tuple[str, str, str]] = set()
            for ns, checkpoints in self.storage.get(thread_id, {}).items():
                if not checkpoints:
                    continue
                latest = max(checkpoints)
                checkpoint, metadata, _parent = checkpoints[latest]
                checkpoints.clear()
                checkpoints[latest] = (checkpoint, metadata, None)
                versions = self.serde.loads_typed(checkpoint)["channel_versions"]
                keep_blobs.update((thread_id, ns, ch, v) for ch, v in versions.items())
                keep_writes.add((thread_id, ns, latest))
            for key in [k for k in self.writes if k[0] == thread_id and k not in keep_writes]:
                del self.writes[key]
            for blob in [k for k in self.blobs if k[0] == thread_id and k not in keep_blobs]:
                del self.blobs[blob]


# -- the registry -----------------------------------------------------------------------------


@dataclass
class _Entry:
    used: float  # clock() when last issued, started or ended
    active: int = 0  # turns running or waiting
    turns: int = 0  # turns that ended well


@dataclass
class _Slot:
    lock: asyncio.Lock
    users: int = 0


class Conversations:
    """The conversations the service holds, and the saver holding them (``saver``).

    ``checkpointer``: a LangGraph checkpointer of yours (then unbounded here), or None
    for a :class:`LatestCheckpointSaver` within ``limits``. ``submit`` runs a coroutine on
    the agent loop (:meth:`AgentLoop.submit`); ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        limits: ConversationLimits,
        checkpointer: BaseCheckpointSaver[Any] | None = None,
        *,
        submit: Submit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.bounded = checkpointer is None
        self.saver = LatestCheckpointSaver() if checkpointer is None else checkpointer
        self._submit = submit
        self._clock = clock
        self._lock = threading.Lock()
        self._live: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._issued: OrderedDict[str, float] = OrderedDict()  # new ids, first turn not begun
        self._slots: dict[str, _Slot] = {}  # touched on the agent loop only
        if self.bounded and limits.idle_ttl > 0:
            submit(self._sweep_forever())

    def __len__(self) -> int:
        """Conversations held in memory (0 with a checkpointer of yours)."""
        with self._lock:
            return len(self._live)

    def new(self) -> str:
        """A new conversation's thread id. It joins the conversations held (evicting the
        least recently used idle one if full) when its first turn begins."""
        thread_id = secrets.token_urlsafe(24)
        if self.bounded:
            with self._lock:
                now = self._clock()
                while self._issued and next(iter(self._issued.values())) < now - ISSUED_GRACE:
                    self._issued.popitem(last=False)  # its stream never began
                self._issued[thread_id] = now
        return thread_id

    def known(self, thread_id: str) -> bool:
        """May ``thread_id`` be continued? With a checkpointer of yours: does it hold it."""
        if not self.bounded:
            config: RunnableConfig = {"configurable": {"thread_id": thread_id}}
            saved = self._submit(self.saver.aget_tuple(config)).result(LOOKUP_TIMEOUT)
            return saved is not None
        with self._lock:
            gone = self._expire()
            found = thread_id in self._live
        self._forget(gone)
        return found

    @asynccontextmanager
    async def turn(self, thread_id: str) -> AsyncIterator[None]:
        """One turn of a conversation, on the agent loop. Raises :class:`UnknownThread` if it
        was forgotten meanwhile. Turns of one conversation run one at a time, in order."""
        if self.bounded:
            self._begin(thread_id)
        ok = False
        try:
            slot = self._slots.setdefault(thread_id, _Slot(asyncio.Lock()))
            slot.users += 1
            try:
                async with slot.lock:
                    yield
                ok = True
            finally:
                slot.users -= 1
                if not slot.users:
                    del self._slots[thread_id]
        finally:
            if self.bounded:
                self._ended(thread_id, ok)

    async def inputs(self, graph: Any, thread_id: str, message: str) -> dict[str, Any]:
        """The graph input of a turn: ``message``, after what falls out of the history budget."""
        incoming = HumanMessage(message)
        state = await graph.aget_state({"configurable": {"thread_id": thread_id}})
        history = state.values.get("messages", []) if state is not None else []
        drop = messages_to_drop(history, incoming, self.limits)
        return {"messages": [*(RemoveMessage(id=m.id) for m in drop if m.id), incoming]}

    # -- under self._lock ---------------------------------------------------------------------

    def _touch(self, thread_id: str, entry: _Entry) -> None:
        entry.used = self._clock()
        self._live.move_to_end(thread_id)  # the order stays the order of `used`

    def _expire(self) -> list[str]:
        ttl = self.limits.idle_ttl
        if ttl <= 0:
            return []
        cutoff = self._clock() - ttl
        gone = []
        for thread_id, entry in self._live.items():
            if entry.used > cutoff:
                break
            if not entry.active:
                gone.append(thread_id)
        for thread_id in gone:
            del self._live[thread_id]
        return gone

    def _evict(self, room: int) -> list[str]:
        excess = len(self._live) + room - self.limits.max_conversations
        gone = [t for t, e in self._live.items() if not e.active][: max(0, excess)]
        for thread_id in gone:
            del self._live[thread_id]
        return gone

    # -- on the agent loop --------------------------------------------------------------------

    def _begin(self, thread_id: str) -> None:
        with self._lock:
            gone = self._expire()
            entry = self._live.get(thread_id)
            if entry is None and self._issued.pop(thread_id, None) is not None:
                gone += self._evict(room=1)  # a new conversation's first turn
                entry = self._live[thread_id] = _Entry(self._clock())
            if entry is not None:
                entry.active += 1
                self._touch(thread_id, entry)
        self._forget(gone)
        if entry is None:
            raise UnknownThread(thread_id)

    def _ended(self, thread_id: str, ok: bool) -> None:
        with self._lock:
            entry = self._live.get(thread_id)
            if entry is None:
                return
            entry.active -= 1
            entry.turns += ok
            self._touch(thread_id, entry)
            if entry.active:  # the last turn out prunes
                return
            gone = [] if entry.turns else [thread_id]  # never answered: nobody has the id
            if gone:
                del self._live[thread_id]
            gone += self._evict(room=0)
        if thread_id not in gone:
            self.saver.prune([thread_id])
        self._forget(gone)

    def _forget(self, thread_ids: list[str]) -> None:
        if thread_ids:
            log.debug("forgetting %d conversation(s)", len(thread_ids))
            self._submit(self._delete(thread_ids))

    async def _delete(self, thread_ids: list[str]) -> None:
        for thread_id in thread_ids:
            await self.saver.adelete_thread(thread_id)

    async def _sweep_forever(self) -> None:
        tick = min(60.0, max(0.05, self.limits.idle_ttl / 4))
        while True:
            await asyncio.sleep(tick)
            with self._lock:
                gone = self._expire()
            await self._delete(gone)
