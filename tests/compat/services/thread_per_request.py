"""Chat service: a thread per request, running the agent with asyncio.run.

COMPAT_LLM_URL=http://127.0.0.1:8401 AZURE_OPENAI_API_KEY=... python thread_per_request.py
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

import httpx2
from chat_common import agent, build_graph, drain, instrument, make_llm, serve, sse
from flask import Flask, Response, request

app = Flask(__name__)
instrument(app)


async def run_agent(message: str, items: queue.Queue[Any]) -> None:
    # A client of this request's own: each asyncio.run() is a new event loop, and the
    # async client langchain-openai shares by default keeps connections bound to the
    # first one ("RuntimeError: Event loop is closed" on every other request).
    async with httpx2.AsyncClient() as http:
        llm = make_llm(http_async_client=http)

        async def call_model(state: dict[str, Any]) -> dict[str, Any]:
            return {"messages": [await llm.ainvoke(state["messages"])]}

        await agent(build_graph(call_model), message, items)


@app.post("/chat")
def chat() -> Response:
    message = request.get_json()["message"]
    items: queue.Queue[Any] = queue.Queue()
    threading.Thread(target=lambda: asyncio.run(run_agent(message, items)), daemon=True).start()
    return Response(drain(items, last=sse({}, "end")), mimetype="text/event-stream")


if __name__ == "__main__":
    serve(app)
