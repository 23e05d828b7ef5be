"""The reference agent: a LangGraph graph with a model node and a tool node.

The model node calls ``AzureChatOpenAI`` (langchain-openai) exactly as the
services chunkwatch is built for do: ``await model.ainvoke(messages)``. Whether
that call streams is decided from outside: under ``astream_events`` LangChain
attaches a streaming handler and the call streams (``--mode tokens``); with
``streaming=False`` and ``stream_mode="updates"`` it does not (``--mode updates``).

The tool node runs one deterministic tool, ``lookup``, so a conversation can
exercise model -> tool -> model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.tools import tool
from langchain_openai import AzureChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

__all__ = ["LOCAL_API_KEY", "LLMConfig", "api_key_from_env", "build_graph", "lookup", "make_model"]


LOCAL_API_KEY = "chunkwatch-local"  # the local upstream accepts any key


def api_key_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The model endpoint's key: ``AZURE_OPENAI_API_KEY``, else ``OPENAI_API_KEY``, else the
    contents of the file ``CHUNKWATCH_API_KEY_FILE`` names (a mounted secret), else the
    local placeholder. An unreadable or empty key file is an error naming the variable,
    never the key."""
    env = os.environ if environ is None else environ
    for name in ("AZURE_OPENAI_API_KEY", "OPENAI_API_KEY"):
        value = env.get(name, "").strip()
        if value:
            return value
    path = env.get("CHUNKWATCH_API_KEY_FILE", "").strip()
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as err:
            raise ValueError(f"CHUNKWATCH_API_KEY_FILE={path!r}: {err.strerror}") from None
        if not value:
            raise ValueError(f"CHUNKWATCH_API_KEY_FILE={path!r}: the file is empty")
        return value
    return LOCAL_API_KEY


@dataclass(frozen=True)
class LLMConfig:
    """Where and how the model is called. ``url`` is usually the gateway."""

    url: str
    deployment: str = "gpt-4o-mini"
    api_version: str = "2024-10-21"
    api_key: str = field(default=LOCAL_API_KEY, repr=False)  # never in a repr or a log
    timeout: float | None = None  # AzureChatOpenAI's own default: no HTTP timeouts
    max_retries: int = 0
    # langchain-openai reads each chunk through asyncio.wait_for when this is > 0, and on
    # Python 3.11 wait_for can swallow the cancel of a departed client's request (CPython
    # gh-86296): its model stream runs on, unread. 0 turns that off; stalls are still cut
    # by chunkwatch's deadlines (the service aborts stalled streams).
    stream_chunk_timeout: float = 0.0


@tool
def lookup(query: str) -> str:
    """Look a query up in the (deterministic, local) knowledge base."""
    digest = hashlib.sha256(query.encode()).hexdigest()[:8]
    return f"lookup result {digest} for {len(query)} characters"


def make_model(config: LLMConfig, *, streaming: bool) -> AzureChatOpenAI:
    """An ``AzureChatOpenAI`` as a service would build it, pointed at ``config.url``."""
    return AzureChatOpenAI(
        azure_endpoint=config.url,
        azure_deployment=config.deployment,
        api_version=config.api_version,
        api_key=config.api_key,  # type: ignore[arg-type]
        timeout=config.timeout,
        max_retries=config.max_retries,
        streaming=streaming,
        stream_chunk_timeout=config.stream_chunk_timeout,
    )


def build_graph(model: BaseChatModel, *, checkpointer: Any = None, guard: Any = None) -> Any:
    """model -> (tool calls?) -> tools -> model ... -> END, with per-thread memory.

    With a :class:`chunkwatch.guard.Guard`, the model node's call falls back to a
    non-streaming call when its token stream is broken.
    """
    bound: Any = model.bind_tools([lookup])
    if guard is not None:
        bound = guard.wrap(bound)

    async def call_model(state: MessagesState) -> dict[str, list[BaseMessage]]:
        reply = await bound.ainvoke(state["messages"])
        return {"messages": [reply]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", call_model)
    graph.add_node("tools", ToolNode([lookup]))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition, {"tools": "tools", END: END})
    graph.add_edge("tools", "model")
    return graph.compile(checkpointer=checkpointer if checkpointer is not None else InMemorySaver())
