"""``chunkwatch serve``: the reference service — the pattern chunkwatch is built for.

A Flask app streams a LangGraph agent's output to the browser over SSE. The
agent runs as a task on one shared background event loop
(:mod:`chunkwatch_lab.loop`); its events reach the WSGI generator through
a thread-safe queue.

``POST /chat`` with JSON ``{"message": str, "thread_id": str?}`` answers
``text/event-stream``. Without ``thread_id`` a new conversation starts; ``event: done``
carries the id the service issued for it, which continues it. Conversation memory is
bounded (:mod:`chunkwatch_lab.conversations`). The event schema (see
``docs/service.md``):

* ``: open`` comment, flushed at once so a proxy in front never waits for the
  first token; ``: heartbeat`` comments while nothing else is sent;
* ``event: token`` ``{"text": str}`` (``--mode tokens``: ``astream_events`` v2,
  one per model token);
* ``event: tool`` ``{"name": str, "output": str}`` (``tokens`` mode, a tool ran);
* ``event: update`` ``{"node": str, "messages": [...]}`` (``--mode updates``:
  model ``streaming=False``, ``stream_mode="updates"``, one per state update);
* ``event: done`` ``{"thread_id": str, "mode": str}`` — the last event of a good
  stream;
* ``event: error`` ``{"type": str, "message": str}`` — the last event of a
  failed stream. The body always ends properly after it.

Bad input gets JSON errors: 400 (invalid JSON, missing or non-string
``message``), 404 ``unknown_thread`` (a ``thread_id`` never issued, or forgotten), 413
(body over 64 KiB). ``GET /healthz`` answers ``{"status": "ok"}``. ``GET /`` is a chat page
(:mod:`chunkwatch_lab.page`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from flask import Flask, Response, jsonify, request
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langgraph.checkpoint.base import BaseCheckpointSaver
from werkzeug.exceptions import HTTPException

import chunkwatch
from chunkwatch.config import UNSET
from chunkwatch.guard import BreakerConfig, Guard, GuardScope
from chunkwatch.ledger import Ledger, bind
from chunkwatch.naming import upstream_name
from chunkwatch.probes.queue import WatchedQueue
from chunkwatch.sse import format_comment, format_event
from chunkwatch.watchdog import Deadlines
from chunkwatch_lab import page
from chunkwatch_lab._input import BadInput, parse_chat
from chunkwatch_lab.agent import LLMConfig, build_graph, make_model
from chunkwatch_lab.conversations import (
    UNKNOWN_THREAD,
    ConversationLimits,
    Conversations,
    UnknownThread,
)
from chunkwatch_lab.loop import AgentLoop

__all__ = ["ChatService", "ServiceConfig", "create_app"]

log = logging.getLogger("chunkwatch.service")

Mode = Literal["tokens", "updates"]
Item = tuple[str, dict[str, Any]]
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class ServiceConfig:
    llm: LLMConfig
    mode: Mode = "tokens"
    heartbeat: float = 15.0  # seconds of silence before a `: heartbeat` comment
    request_timeout: float = 300.0  # the whole agent run, a last line of defence
    instrument: bool = True
    # Instrumentation parts (tests inject their own); None: the process defaults.
    registry: Any = None
    tracer_provider: Any = None
    deadlines: Deadlines | None = None
    upstreams: dict[str, str] | None = None  # None: CHUNKWATCH_UPSTREAMS, else host:port
    # The guard: fall back to state streaming when token streaming is broken.
    guard: bool = True
    breaker: BreakerConfig | None = None
    # Conversation memory: in this process, within these limits (CHUNKWATCH_* variables);
    # or a LangGraph checkpointer of yours (AsyncPostgresSaver ...), whose retention is yours.
    conversations: ConversationLimits = field(default_factory=ConversationLimits.from_env)
    checkpointer: BaseCheckpointSaver[Any] | None = None
    # False: no /metrics on the app's port (served on a port of its own instead, which the
    # clients' network does not reach: `chunkwatch serve --metrics-port`).
    serve_metrics: bool = True
    # The demo's fault switch for its page (side -> loopback gateway URL): None, as always
    # outside `chunkwatch demo --serve`, means no /lab/faults route (chunkwatch_lab.lab_faults).
    lab_gateways: dict[str, str] | None = None


def message_json(msg: BaseMessage) -> dict[str, Any]:
    """The wire form of a message in an ``update`` event."""
    if isinstance(msg, AIMessage):
        out: dict[str, Any] = {"role": "assistant", "content": msg.text}
        if msg.tool_calls:
            out["tool_calls"] = [
                {"id": c["id"], "name": c["name"], "args": c["args"]} for c in msg.tool_calls
            ]
        return out
    if isinstance(msg, ToolMessage):
        return {"role": "tool", "name": msg.name, "content": msg.text}
    if isinstance(msg, HumanMessage):
        return {"role": "user", "content": msg.text}
    return {"role": msg.type, "content": msg.text}


class ChatService:
    """The agent side: runs one chat on the shared loop and hands items to a queue."""

    def __init__(self, config: ServiceConfig, loop: AgentLoop | None = None) -> None:
        self.config = config
        self.loop = loop or AgentLoop()
        self.conversations = Conversations(
            config.conversations, config.checkpointer, submit=self.loop.submit
        )
        checkpointer = self.conversations.saver
        self.guard = Guard(config.breaker or BreakerConfig.from_env()) if config.guard else None
        self.graphs = {
            "tokens": build_graph(
                make_model(config.llm, streaming=True), checkpointer=checkpointer, guard=self.guard
            ),
            "updates": build_graph(
                make_model(config.llm, streaming=False), checkpointer=checkpointer
            ),
        }

    async def run(
        self,
        message: str,
        thread_id: str,
        mode: Mode,
        items: WatchedQueue[Item],
        ledger: Ledger | None = None,
    ) -> None:
        """Run the agent and put every item; the last one is ``done`` or ``error``."""
        put = items.put
        with bind(ledger), self._guarded(mode, put) as scope:  # ledger and trace cross here
            try:
                if scope is not None and scope.mode != mode:  # the breaker is open
                    mode = "updates"
                    put(("mode", {"mode": mode, "reason": scope.reason}))
                deadline = self.config.request_timeout
                async with (
                    asyncio.timeout(deadline if deadline and deadline > 0 else None),
                    self.conversations.turn(thread_id),
                ):
                    if mode == "tokens":
                        await self._tokens(message, thread_id, put, scope)
                    else:
                        await self._updates(message, thread_id, put)
            except UnknownThread:  # forgotten between the request's check and its turn
                put(("error", {"type": "unknown_thread", "message": UNKNOWN_THREAD}))
            except Exception as exc:  # every failure reaches the client as `event: error`
                log.info("chat failed: %s: %s", type(exc).__name__, exc)
                put(("error", _error(exc, ledger)))
            else:
                put(("done", {"thread_id": thread_id, "mode": mode}))
            finally:
                items.producer_done()

    @contextmanager
    def _guarded(self, mode: Mode, put: Callable[[Item], None]) -> Iterator[GuardScope | None]:
        """The request under the guard (tokens mode only): announces a switch to updates."""
        if self.guard is None or mode != "tokens":
            yield None
            return

        def announce(reason: str) -> None:
            put(("mode", {"mode": "updates", "reason": reason}))

        with self.guard.scope(self._upstream(), on_switch=announce) as scope:
            yield scope

    def _upstream(self) -> str:
        rt = chunkwatch.runtime.active()
        url = self.config.llm.url
        if rt is not None:
            return rt.upstream_for(url)
        return upstream_name(url, self.config.upstreams or {})

    async def _tokens(
        self,
        message: str,
        thread_id: str,
        put: Callable[[Item], None],
        scope: GuardScope | None = None,
    ) -> None:
        """astream_events v2: tokens as they come; after a guard switch, node updates."""
        inputs = await self.conversations.inputs(self.graphs["tokens"], thread_id, message)
        config = {"configurable": {"thread_id": thread_id}}
        async for ev in self.graphs["tokens"].astream_events(inputs, config, version="v2"):
            kind = ev["event"]
            tokens = scope is None or scope.mode == "tokens"
            if kind == "on_chat_model_stream":
                text = ev["data"]["chunk"].text
                if text and tokens:
                    put(("token", {"text": text}))
            elif kind == "on_tool_end" and tokens:
                output = ev["data"].get("output")
                content = output.text if isinstance(output, BaseMessage) else str(output)
                put(("tool", {"name": ev["name"], "output": content}))
            elif kind == "on_chain_end" and not tokens:
                node = ev.get("metadata", {}).get("langgraph_node")
                output = ev["data"].get("output")
                if node == ev["name"] and isinstance(output, dict):
                    messages = output.get("messages", [])
                    put(("update", {"node": node, "messages": [message_json(m) for m in messages]}))

    async def _updates(self, message: str, thread_id: str, put: Callable[[Item], None]) -> None:
        graph = self.graphs["updates"]
        inputs = await self.conversations.inputs(graph, thread_id, message)
        config = {"configurable": {"thread_id": thread_id}}
        async for update in graph.astream(inputs, config, stream_mode="updates"):
            for node, delta in update.items():
                messages = (delta or {}).get("messages", [])
                put(("update", {"node": node, "messages": [message_json(m) for m in messages]}))

    def stream(
        self,
        message: str,
        thread_id: str,
        mode: Mode | None = None,
        ledger: Ledger | None = None,
    ) -> Iterator[bytes]:
        """The SSE body: open comment, items as events, heartbeats; cancels the run on close."""
        items: WatchedQueue[Item] = WatchedQueue(ledger)
        future = self.loop.submit(
            self.run(message, thread_id, mode or self.config.mode, items, ledger)
        )
        finished = False
        try:
            yield format_comment("open")
            while True:
                try:
                    name, payload = items.get(timeout=self.config.heartbeat)
                except queue.Empty:
                    yield format_comment("heartbeat")
                    continue
                yield format_event(json.dumps(payload), event=name)
                if name in ("done", "error"):
                    finished = True
                    return
        finally:
            items.consumer_done(complete=finished)
            if not finished:  # the client went away: stop the agent and its upstream call
                future.cancel()


def _error(exc: BaseException, ledger: Ledger | None) -> dict[str, Any]:
    if isinstance(exc, TimeoutError) and not isinstance(exc, chunkwatch.StreamStalledError):
        return {"type": "timeout", "message": "the agent run exceeded --request-timeout"}
    return chunkwatch.error_payload(exc, ledger)


def _json_error(status: int, message: str, kind: str) -> Response:
    resp = jsonify({"error": {"type": kind, "message": message}})
    resp.status_code = status
    return resp


def create_app(config: ServiceConfig, service: ChatService | None = None) -> Flask:
    """The Flask app. ``app.extensions["chunkwatch.chat"]`` is the :class:`ChatService`."""
    # No Flask static route: the page's files are served by name only (chunkwatch_lab.page).
    app = Flask("chunkwatch_lab", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    chat = service or ChatService(config)
    app.extensions["chunkwatch.chat"] = chat
    if config.instrument:
        chunkwatch.instrument(
            app,
            registry=config.registry,
            tracer_provider=config.tracer_provider,
            upstreams=UNSET if config.upstreams is None else config.upstreams,
            # AzureChatOpenAI has no HTTP timeouts: abort a stalled upstream stream.
            deadlines=config.deadlines or Deadlines.from_env(abort=True),
            metrics_path=UNSET if config.serve_metrics else None,  # UNSET: the default
        )

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        kind = {413: "payload_too_large", 404: "not_found", 405: "method_not_allowed"}
        code = exc.code or 500
        message = exc.description or exc.name
        if code == 413:
            message = f"request body over {MAX_BODY} bytes"
        return _json_error(code, message, kind.get(code, "bad_request"))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # The details (which may name internal hosts) go to the log, not to the client.
        log.exception("unhandled error before the stream started")
        return _json_error(500, "internal error; see the service log", "internal_error")

    app.register_blueprint(page.blueprint)  # the chat page at /, docs/browser.md
    if config.lab_gateways is not None:
        from chunkwatch_lab import lab_faults

        app.register_blueprint(lab_faults.blueprint(config.lab_gateways))

    @app.get("/healthz")
    def healthz() -> Response:
        # "lab": the page's fault panel asks here whether /lab/faults exists, since asking
        # that route itself would be a 404 (a console error) on every other service.
        lab = {"lab": ["faults"]} if config.lab_gateways is not None else {}
        return jsonify({"status": "ok", "mode": config.mode, **lab})

    @app.post("/chat")
    def chat_route() -> Response:
        try:
            given = parse_chat(request.get_data(cache=False))
        except BadInput as err:
            return _json_error(400, err.message, err.kind)
        conversations = chat.conversations
        if given.thread_id is None:
            thread_id = conversations.new()
        elif conversations.known(given.thread_id):
            thread_id = given.thread_id
        else:
            return _json_error(404, UNKNOWN_THREAD, "unknown_thread")
        return Response(
            chat.stream(given.message, thread_id, ledger=chunkwatch.request_ledger()),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app
