"""The local model endpoint: OpenAI-exact stream and non-stream shapes, Azure and /v1
paths through the real SDK, deterministic answers, tool calls, errors, and pace under load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from chunkwatch.reference.threaded import Running, start_in_thread
from chunkwatch.reference.upstream import Upstream, answer_tokens, tool_call_id
from chunkwatch.sse import SSEParser

USER: Any = [{"role": "user", "content": "What is the weather like?"}]
UPSTREAM_TOKENS = 12  # the session upstream fixture (conftest.py)
ANSWER = answer_tokens("What is the weather like?", UPSTREAM_TOKENS)
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "look something up",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


def post(url: str, body: Any, path: str = "/v1/chat/completions") -> httpx2.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx2.post(url + path, content=content, headers={"Content-Type": "application/json"})


def stream_events(
    url: str, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> tuple[httpx2.Response, list[str]]:
    """The raw `data:` payloads of a streamed answer, in order."""
    resp = post(url, {**body, "stream": True}, path)
    parser = SSEParser(collect=True)
    events = parser.feed(resp.content) + parser.close()
    assert parser.pending_fields == 0 and parser.malformed == 0
    return resp, [e.data for e in events]


def test_stream_is_exactly_openais_chunk_sequence(upstream: Running[Upstream]) -> None:
    """stream=true: role chunk, one chunk per token, finish chunk, usage chunk
    (include_usage), [DONE], in that order and nothing else."""
    resp, data = stream_events(
        upstream.url,
        {"model": "gpt-4o", "messages": USER, "stream_options": {"include_usage": True}},
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["transfer-encoding"] == "chunked" and "content-length" not in resp.headers
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len(chunks) == 1 + UPSTREAM_TOKENS + 2
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"gpt-4o"}
    assert len({c["id"] for c in chunks}) == 1
    role, tokens, finish, usage = chunks[0], chunks[1:-2], chunks[-2], chunks[-1]
    assert role["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert [c["choices"][0]["delta"] for c in tokens] == [{"content": t} for t in ANSWER]
    assert all(c["choices"][0]["finish_reason"] is None for c in tokens)
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == UPSTREAM_TOKENS
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + UPSTREAM_TOKENS


def test_stream_without_include_usage_has_no_usage_chunk(upstream: Running[Upstream]) -> None:
    """Without stream_options.include_usage the finish chunk is followed directly by [DONE]."""
    _, data = stream_events(upstream.url, {"model": "m", "messages": USER})
    assert len(data) == 1 + UPSTREAM_TOKENS + 1 + 1
    assert json.loads(data[-2])["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in json.loads(d) for d in data[:-1])


def test_non_stream_is_a_chat_completion_with_usage(upstream: Running[Upstream]) -> None:
    """stream=false (or absent): one chat.completion JSON with Content-Length and usage."""
    resp = post(upstream.url, {"model": "gpt-4o-mini", "messages": USER})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert int(resp.headers["content-length"]) == len(resp.content)
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "gpt-4o-mini"
    assert body["choices"][0]["message"]["content"] == "".join(ANSWER)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == UPSTREAM_TOKENS


def test_model_defaults_to_the_azure_deployment_name(upstream: Running[Upstream]) -> None:
    """Without `model` in the body, chunks carry the deployment name from the Azure path."""
    path = "/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21"
    _, data = stream_events(upstream.url, {"messages": USER}, path)
    assert json.loads(data[0])["model"] == "my-deployment"


def test_azure_client_streams_and_completes(upstream: Running[Upstream]) -> None:
    """openai.AzureOpenAI (deployment path + api-version) gets the full answer both ways."""
    client = openai.AzureOpenAI(
        azure_endpoint=upstream.url, api_key="k", api_version="2024-10-21", max_retries=0, timeout=5
    )
    done = client.chat.completions.create(model="dep", messages=USER)
    assert done.choices[0].message.content == "".join(ANSWER)
    chunks = list(
        client.chat.completions.create(
            model="dep",
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len(chunks) == UPSTREAM_TOKENS + 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(ANSWER)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == UPSTREAM_TOKENS


def test_openai_client_on_v1_path(upstream: Running[Upstream]) -> None:
    """openai.OpenAI with base_url .../v1 streams the same deterministic answer."""
    client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="k", max_retries=0, timeout=5)
    stream = client.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(ANSWER)


def test_answer_tokens_is_deterministic_across_processes() -> None:
    """The same prompt gives the same tokens in any process (no use of hash()); tokens join
    to the answer; different prompts give different answers."""
    tokens = answer_tokens("hello there", 20)
    assert len(tokens) == 20 and all(t.endswith((" ", ".")) for t in tokens)
    assert tokens == answer_tokens("hello there", 20)
    assert answer_tokens("hello there", 5) == [*tokens[:4], tokens[4].rstrip() + "."]
    assert answer_tokens("something else", 20) != tokens
    code = (
        "from chunkwatch.reference.upstream import answer_tokens; "
        "print(answer_tokens('hello there', 20))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == repr(tokens)
    assert answer_tokens("x", 0) == []


def test_tool_call_streams_like_openai_and_parses_with_the_sdk(upstream: Running[Upstream]) -> None:
    """tools + a user message with [[tool]]: first delta carries id/name and empty arguments,
    then argument fragments; they join to {"query": <user text>}; finish_reason tool_calls."""
    text = "please [[tool]] look up the weather"
    client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="k", max_retries=0, timeout=5)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": text}],
            tools=TOOLS,
            stream=True,
        )
    )
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.tool_calls is not None
    call = first.tool_calls[0]
    assert call.id == tool_call_id(text) and call.id.startswith("call_")
    assert (
        call.function is not None
        and call.function.name == "lookup"
        and call.function.arguments == ""
    )
    fragments = [c.choices[0].delta.tool_calls for c in chunks[1:-1]]
    assert len(fragments) > 1
    arguments = "".join(f[0].function.arguments or "" for f in fragments if f and f[0].function)
    assert json.loads(arguments) == {"query": text}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_call_non_stream_and_text_after_the_tool_result(upstream: Running[Upstream]) -> None:
    """Non-stream tool call is one message.tool_calls entry; after a `tool` message, or
    without the marker, or without tools, the answer is text."""
    text = "[[tool]] find it"
    client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="k", max_retries=0, timeout=5)
    first = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], tools=TOOLS
    )
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert msg.tool_calls is not None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.id == tool_call_id(text)
    assert call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"query": text}
    history: list[Any] = [
        {"role": "user", "content": text},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    after = client.chat.completions.create(model="m", messages=history, tools=TOOLS)
    assert after.choices[0].finish_reason == "stop"
    assert after.choices[0].message.content == "".join(answer_tokens(text, UPSTREAM_TOKENS))
    plain = client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}])
    assert plain.choices[0].message.content and plain.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", None, None),
        (b"[1, 2]", None, None),
        (b'{"model": "m"}', "messages", "missing_required_parameter"),
        (b'{"model": "m", "messages": "hi"}', "messages", "invalid_type"),
        (b'{"model": "m", "messages": []}', "messages", "empty_array"),
        (b'{"model": "m", "messages": [42]}', "messages[0]", "invalid_type"),
    ],
)
def test_bad_requests_get_openai_400s(
    upstream: Running[Upstream], body: bytes, param: str | None, code: str | None
) -> None:
    """Invalid JSON / missing, non-list or empty messages -> 400 with an OpenAI error
    body {"error": {message, type, param, code}}."""
    resp = post(upstream.url, body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_sdk_sees_bad_request_error(upstream: Running[Upstream]) -> None:
    """The SDK turns the upstream's 400 into openai.BadRequestError with the message."""
    client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="k", max_retries=0, timeout=5)
    with pytest.raises(openai.BadRequestError, match="empty array"):
        client.chat.completions.create(model="m", messages=[])


def test_unknown_path_404_and_wrong_method_405(upstream: Running[Upstream]) -> None:
    """Unknown path -> 404 OpenAI-shaped error; GET on the chat path -> 405 with Allow: POST."""
    resp = post(upstream.url, {"messages": USER}, "/v1/embeddings")
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "invalid_request_error"
    resp = httpx2.get(upstream.url + "/v1/chat/completions")
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    assert resp.json()["error"]["message"]


def test_stats_count_stream_and_non_stream_requests() -> None:
    """GET /_stats counts requests by kind; DELETE /_stats resets the counters."""
    with start_in_thread(Upstream(tokens=2, token_delay=0)) as up:
        post(up.url, {"messages": USER})
        post(up.url, {"messages": USER, "stream": True})
        post(up.url, {"messages": []})
        stats = httpx2.get(up.url + "/_stats").json()
        assert stats["requests"] == 3
        assert (stats["stream_requests"], stats["non_stream_requests"], stats["bad_requests"]) == (
            1,
            1,
            1,
        )
        assert (stats["completed_streams"], stats["active_streams"]) == (1, 0)
        assert httpx2.delete(up.url + "/_stats").json()["requests"] == 0


def test_client_disconnect_stops_the_stream() -> None:
    """A client that goes away mid-stream: the upstream stops producing (aborted_streams)."""
    with start_in_thread(Upstream(tokens=200, token_delay=0.01)) as up:
        body = json.dumps({"messages": USER, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", up.port)) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
                % (len(body), body)
            )
            sock.recv(4096)
            time.sleep(0.05)
        deadline = time.monotonic() + 2
        while up.server.stats["active_streams"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert up.server.stats["aborted_streams"] == 1 and up.server.stats["active_streams"] == 0


# -- the HTTP toolkit's limits ---------------------------------------------------------------


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n", b"413"),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", b"400"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"411"),
        (b"NOT A REQUEST\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nno-colon-here\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400"),
    ],
    ids=[
        "body-over-1MiB",
        "head-over-64KiB",
        "chunked-body",
        "bad-request-line",
        "bad-header",
        "bad-length",
    ],
)
def test_http_limits(upstream: Running[Upstream], request_bytes: bytes, status: bytes) -> None:
    """Oversized, chunked or malformed requests are refused with a status, and the
    connection is closed."""
    out = raw_exchange(upstream.port, request_bytes)
    assert out.split(b" ")[1] == status
    assert b"Connection: close" in out


def test_keep_alive_serves_several_requests_on_one_connection(upstream: Running[Upstream]) -> None:
    """HTTP/1.1 keeps the connection: non-stream, stream, non-stream on one socket."""
    with socket.create_connection(("127.0.0.1", upstream.port), timeout=5) as sock:
        reader = sock.makefile("rb")
        for stream in (False, True, False):
            body = json.dumps({"messages": USER, "stream": stream}).encode()
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
                % (len(body), body)
            )
            assert reader.readline().startswith(b"HTTP/1.1 200")
            headers = {}
            while (line := reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            assert "connection" not in headers
            if stream:
                while (size := int(reader.readline(), 16)) != 0:
                    reader.read(size + 2)
                assert reader.readline() == b"\r\n"
            else:
                reply = json.loads(reader.read(int(headers["content-length"])))
                assert reply["choices"][0]["message"]["content"] == "".join(ANSWER)


# -- pace under load -------------------------------------------------------------------------


@pytest.fixture
def upstream_process() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`python -m chunkwatch.reference.upstream` in its own process (50 tokens, 20 ms apart)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chunkwatch.reference.upstream",
            "--port",
            "0",
            "--tokens",
            "50",
            "--token-delay",
            "0.02",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("chunkwatch upstream listening on http://127.0.0.1:"), line
        yield line.split()[-1], proc
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0


async def _one_stream(port: int, prompt: str) -> tuple[str, float]:
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": True}
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
    writer.write(b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    raw = await reader.read(-1)
    elapsed = time.perf_counter() - start
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    parser = SSEParser(collect=True)
    content = ""
    for event in parser.feed(_dechunk(body)):
        if event.data != "[DONE]":
            for choice in json.loads(event.data)["choices"]:
                content += choice["delta"].get("content") or ""
    assert head.startswith(b"HTTP/1.1 200")
    return content, elapsed


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


def test_200_concurrent_streams_keep_pace(
    upstream_process: tuple[str, subprocess.Popen[str]],
) -> None:
    """200 concurrent streams of 50 tokens at 20 ms (1.0 s each) all complete with the full
    answer, and the whole batch ends within expected x 2 + 1 s = 3 s of wall time (the
    upstream runs in its own process on this 2-core machine; the client here)."""
    url, _ = upstream_process
    port = int(url.rsplit(":", 1)[1])
    prompts = [f"question number {i}" for i in range(200)]

    async def run_all() -> list[tuple[str, float]]:
        return await asyncio.gather(*(_one_stream(port, p) for p in prompts))

    start = time.perf_counter()
    results = asyncio.run(run_all())
    wall = time.perf_counter() - start
    expected = 50 * 0.02
    slowest = max(elapsed for _, elapsed in results)
    print(
        f"200 streams x 50 tokens: wall {wall:.2f} s, slowest stream {slowest:.2f} s, "
        f"expected {expected:.2f} s"
    )
    for prompt, (content, _) in zip(prompts, results, strict=True):
        assert content == "".join(answer_tokens(prompt, 50))
    assert wall <= expected * 2 + 1
