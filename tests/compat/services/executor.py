"""Chat service: a module-level ThreadPoolExecutor runs the agent with asyncio.run.

COMPAT_LLM_URL=http://127.0.0.1:8401 AZURE_OPENAI_API_KEY=... python executor.py
"""

from __future__ import annotations

import asyncio
import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from chat_common import agent_on_a_new_loop, drain, instrument, serve, sse
from flask import Flask, Response, request

app = Flask(__name__)
instrument(app)
EXECUTOR = ThreadPoolExecutor(max_workers=8, thread_name_prefix="agent")


@app.post("/chat")
def chat() -> Response:
    message = request.get_json()["message"]
    items: queue.Queue[Any] = queue.Queue()
    EXECUTOR.submit(lambda: asyncio.run(agent_on_a_new_loop(message, items)))
    return Response(drain(items, last=sse("[DONE]")), mimetype="text/event-stream")


if __name__ == "__main__":
    serve(app)
