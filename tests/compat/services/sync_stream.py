"""Chat service: no queue, no thread of its own — the response iterates graph.stream.

COMPAT_LLM_URL=http://127.0.0.1:8401 AZURE_OPENAI_API_KEY=... python sync_stream.py
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from chat_common import build_graph, instrument, make_llm, serve, sse
from flask import Flask, Response, request

app = Flask(__name__)
instrument(app)
llm = make_llm()


def call_model(state: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [llm.invoke(state["messages"])]}


graph = build_graph(call_model)


@app.post("/chat")
def chat() -> Response:
    inputs = {"messages": [("user", request.get_json()["message"])]}

    def generate() -> Iterator[str]:
        try:
            for chunk, _metadata in graph.stream(inputs, stream_mode="messages"):
                if chunk.content:
                    yield sse({"token": chunk.content})
            yield sse({}, "end")
        except Exception as exc:
            yield sse({"error": str(exc)}, "error")

    return Response(generate(), mimetype="text/event-stream")


if __name__ == "__main__":
    serve(app)
