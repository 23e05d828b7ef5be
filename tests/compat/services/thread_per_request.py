"""Chat service: a thread per request, running the agent with asyncio.run.

COMPAT_LLM_URL=http://127.0.0.1:8401 AZURE_OPENAI_API_KEY=... python thread_per_request.py
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

from chat_common import agent_on_a_new_loop, drain, instrument, serve, sse
from flask import Flask, Response, request

app = Flask(__name__)
instrument(app)


@app.post("/chat")
def chat() -> Response:
    message = request.get_json()["message"]
    items: queue.Queue[Any] = queue.Queue()
    threading.Thread(
        target=lambda: asyncio.run(agent_on_a_new_loop(message, items)), daemon=True
    ).start()
    return Response(drain(items, last=sse({}, "end")), mimetype="text/event-stream")


if __name__ == "__main__":
    serve(app)
