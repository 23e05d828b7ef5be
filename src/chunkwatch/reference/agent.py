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
from dataclasses import dataclass
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.tools import tool
from langchain_openai import AzureChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

__all__ = ["LLMConfig", "build_graph", "lookup", "make_model"]


@dataclass(frozen=True)
class LLMConfig:
    """Where and how the model is called. ``url`` is usually the gateway."""

    url: str
    deployment: str = "gpt-4o-mini"
    api_version: str = "2024-10-21"
    api_key: str = "chunkwatch-local"  # the local upstream accepts any key
    timeout: float | None = None  # AzureChatOpenAI's own default: no HTTP timeouts
    max_retries: int = 0


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
