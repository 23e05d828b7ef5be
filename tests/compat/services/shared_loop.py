"""Chat service: one asyncio loop in a background thread, fed by run_coroutine_threadsafe.

COMPAT_LLM_URL=http://127.0.0.1:8401 AZURE_OPENAI_API_KEY=... python shared_loop.py
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

from chat_common import agent, build_graph, drain, instrument, make_llm, serve, sse
from flask import Flask, Response, request

app = Flask(__name__)
instrument(app)
llm = make_llm()


async def call_model(state: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [await llm.ainvoke(state["messages"])]}


graph = build_graph(call_model)
LOOP = asyncio.new_event_loop()
threading.Thread(target=LOOP.run_forever, name="agent-loop", daemon=True).start()


@app.post("/chat")
def chat() -> Response:
    items: queue.Queue[Any] = queue.Queue()
    asyncio.run_coroutine_threadsafe(agent(graph, request.get_json()["message"], items), LOOP)
    return Response(drain(items, last=sse("[DONE]")), mimetype="text/event-stream")


if __name__ == "__main__":
    serve(app)
