"""Chat service: the shared-loop shape, fixed for departed clients.

As ``shared_loop.py``, plus what docs/runbooks.md#chunkwatchorphanedstreams asks for: the
response's generator cancels the agent when the client goes away, and langchain-openai's
per-chunk ``asyncio.wait_for`` is off (``stream_chunk_timeout=0``), because on Python 3.11
it can swallow that cancel (CPython gh-86296).

COMPAT_LLM_URL=http://127.0.0.1:8401 AZURE_OPENAI_API_KEY=... python shared_loop_cancelled.py
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from typing import Any

from chat_common import agent, build_graph, drain, instrument, make_llm, serve, sse
from flask import Flask, Response, request

app = Flask(__name__)
instrument(app)
llm = make_llm(stream_chunk_timeout=0)


async def call_model(state: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [await llm.ainvoke(state["messages"])]}


graph = build_graph(call_model)
LOOP = asyncio.new_event_loop()
threading.Thread(target=LOOP.run_forever, name="agent-loop", daemon=True).start()


@app.post("/chat")
def chat() -> Response:
    items: queue.Queue[Any] = queue.Queue()
    run = asyncio.run_coroutine_threadsafe(agent(graph, request.get_json()["message"], items), LOOP)

    def body() -> Iterator[str]:
        try:
            yield from drain(items, last=sse("[DONE]"))
        finally:
            run.cancel()  # the client left (or the answer is complete): stop the model call

    return Response(body(), mimetype="text/event-stream")


if __name__ == "__main__":
    serve(app)
