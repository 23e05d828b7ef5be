"""The local model endpoint: OpenAI-exact stream and non-stream shapes, Azure and /v1
paths through the real SDK, deterministic answers, tool calls, errors, and pace under load."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from chunkwatch.sse import SSEParser
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import (
    TRACEPARENTS_KEPT,
    Upstream,
    add_upstream_parser,
    answer_tokens,
    tool_call_id,
    upstream_from_args,
)

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
        "from chunkwatch_lab.upstream import answer_tokens; print(answer_tokens('hello there', 20))"
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


def test_stats_keep_the_last_traceparents_received() -> None:
    """GET /_stats lists the `traceparent` header of the last TRACEPARENTS_KEPT chat requests,
    oldest first, null for a request without one; DELETE /_stats empties the list."""
    with start_in_thread(Upstream(tokens=1, token_delay=0)) as up:
        assert httpx2.get(up.url + "/_stats").json()["traceparents"] == []
        sent = [f"00-{i:032x}-{i:016x}-01" for i in range(1, TRACEPARENTS_KEPT + 3)]
        body = json.dumps({"messages": USER, "stream": True}).encode()
        for tp in sent:  # urllib: no probe of any tool in this process touches its headers
            req = urllib.request.Request(
                up.url + "/v1/chat/completions", data=body, headers={"traceparent": tp}
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
        post(up.url, {"messages": USER})
        got = httpx2.get(up.url + "/_stats").json()["traceparents"]
        assert got == [*sent[-(TRACEPARENTS_KEPT - 1) :], None]
        assert list(up.server.traceparents) == got
        assert httpx2.delete(up.url + "/_stats").json()["traceparents"] == []
        assert httpx2.get(up.url + "/_stats").json()["traceparents"] == []


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


# -- realism: generation time, time to first token, Azure content filtering ---------------

SAFE = {"filtered": False, "severity": "safe"}
PROMPT_FILTER_CHUNK = {
    "id": "",
    "object": "",
    "created": 0,
    "model": "",
    "choices": [],
    "prompt_filter_results": [
        {
            "prompt_index": 0,
            "content_filter_results": {
                "hate": SAFE,
                "self_harm": SAFE,
                "sexual": SAFE,
                "violence": SAFE,
                "jailbreak": {"filtered": False, "detected": False},
            },
        }
    ],
}


def timed_post(url: str, body: dict[str, Any]) -> tuple[httpx2.Response, float]:
    start = time.perf_counter()
    resp = post(url, body)
    return resp, time.perf_counter() - start


def test_non_stream_answer_takes_the_generation_time() -> None:
    """stream=false answers after first_token_delay + tokens x token_delay (0.05 + 8 x 0.03 =
    0.29 s), no sooner than the same answer streamed ends; a tool call waits one token_delay
    per argument fragment, as its stream does."""
    answer = "".join(answer_tokens(USER[0]["content"], 8))
    with start_in_thread(Upstream(tokens=8, token_delay=0.03, first_token_delay=0.05)) as up:
        resp, buffered = timed_post(up.url, {"messages": USER})
        assert resp.json()["choices"][0]["message"]["content"] == answer
        _, streamed = timed_post(up.url, {"messages": USER, "stream": True})
        assert 0.28 <= buffered < 0.29 + 0.3
        assert buffered >= streamed - 0.05
        text = "[[tool]] look it up"
        fragments = -(-len(json.dumps({"query": text})) // 12)  # 12 characters per fragment
        tool = {"messages": [{"role": "user", "content": text}], "tools": TOOLS}
        resp, tool_time = timed_post(up.url, tool)
        assert resp.json()["choices"][0]["finish_reason"] == "tool_calls"
        assert tool_time >= 0.05 + fragments * 0.03 - 0.01


def head_and_first_event(port: int) -> tuple[float, float, bytes]:
    """Seconds to the end of the response head and to the first `data:` line, and the bytes."""
    body = json.dumps({"messages": USER, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        start = time.perf_counter()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        data, t_head = b"", None
        while b"data:" not in data.partition(b"\r\n\r\n")[2]:
            data += sock.recv(65536)
            if t_head is None and b"\r\n\r\n" in data:
                t_head = time.perf_counter() - start
        t_first = time.perf_counter() - start
        while more := sock.recv(65536):
            data += more
    assert t_head is not None
    return t_head, t_first, data


def test_first_token_delay_holds_the_role_chunk_not_the_head() -> None:
    """first_token_delay: the 200 head goes out at once, the role chunk follows after the
    delay, then the tokens, finish chunk and [DONE]; setting it on the running server
    applies to the next request."""
    with start_in_thread(Upstream(tokens=3, token_delay=0.0, first_token_delay=0.3)) as up:
        t_head, t_first, data = head_and_first_event(up.port)
        assert data.startswith(b"HTTP/1.1 200") and t_head < 0.15 and t_first >= 0.29
        assert b'"role": "assistant"' in data and data.count(b"data: ") == 1 + 3 + 1 + 1
        up.server.first_token_delay = 0.0
        _, t_first, _ = head_and_first_event(up.port)
        assert t_first < 0.2


def test_azure_content_filter_stream_on_the_wire() -> None:
    """content_filter: the first SSE event is Azure's prompt-filter chunk, exactly; text
    chunks then rate their content (`content_filter_results` with every category safe), the
    role and finish chunks carry `{}`; the rest of the stream is unchanged."""
    with start_in_thread(Upstream(tokens=4, token_delay=0, content_filter=True)) as up:
        _, data = stream_events(up.url, {"model": "m", "messages": USER})
    assert json.loads(data[0]) == PROMPT_FILTER_CHUNK
    role, *tokens, finish = [json.loads(d)["choices"][0] for d in data[1:-1]]
    assert role["content_filter_results"] == finish["content_filter_results"] == {}
    assert role["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert [t["delta"]["content"] for t in tokens] == answer_tokens(USER[0]["content"], 4)
    for token in tokens:
        assert token["content_filter_results"] == {
            "hate": SAFE,
            "self_harm": SAFE,
            "sexual": SAFE,
            "violence": SAFE,
        }
    assert finish["finish_reason"] == "stop" and data[-1] == "[DONE]"


def test_azure_client_streams_the_full_answer_past_the_prompt_filter_chunk(
    azure_upstream: Running[Upstream],
) -> None:
    """openai.AzureOpenAI yields the prompt-filter event as a chunk with `choices == []`
    (its filter results in `model_extra`), then the role, token, finish and usage chunks:
    the joined content is the full answer. The non-stream answer carries
    `prompt_filter_results` and the choice's `content_filter_results`, as Azure's does."""
    client = openai.AzureOpenAI(
        azure_endpoint=azure_upstream.url,
        api_key="k",
        api_version="2024-10-21",
        max_retries=0,
        timeout=5,
    )
    chunks = list(
        client.chat.completions.create(
            model="dep", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    first = chunks[0]
    assert first.choices == [] and first.id == "" and first.usage is None
    assert (first.model_extra or {})["prompt_filter_results"] == PROMPT_FILTER_CHUNK[
        "prompt_filter_results"
    ]
    assert len(chunks) == 1 + UPSTREAM_TOKENS + 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(ANSWER)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == UPSTREAM_TOKENS
    done = client.chat.completions.create(model="dep", messages=USER)
    assert done.choices[0].message.content == "".join(ANSWER)
    assert (done.model_extra or {})["prompt_filter_results"][0]["prompt_index"] == 0
    assert (done.choices[0].model_extra or {})["content_filter_results"]["hate"] == SAFE


def test_content_filter_switches_on_a_running_server() -> None:
    """content_filter and tokens set on the running server apply from the next request on;
    a request already streaming keeps the settings it started with."""
    with start_in_thread(Upstream(tokens=2, token_delay=0.1)) as up:
        body = json.dumps({"messages": USER, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", up.port), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            early = sock.recv(65536)  # the head and the role chunk
            up.server.content_filter, up.server.tokens, up.server.token_delay = True, 5, 0.0
            while more := sock.recv(65536):
                early += more
        assert b"prompt_filter_results" not in early and early.count(b"data: ") == 1 + 2 + 1 + 1
        _, filtered = stream_events(up.url, {"messages": USER})
        assert json.loads(filtered[0]) == PROMPT_FILTER_CHUNK
        assert len(filtered) == 1 + 1 + 5 + 1 + 1
        assert "prompt_filter_results" in post(up.url, {"messages": USER}).json()


def test_cli_options_reach_the_server() -> None:
    """`chunkwatch upstream --first-token-delay S --azure-content-filter` builds an Upstream
    with those settings; without the flags, no delay and no filter."""
    parser = argparse.ArgumentParser()
    add_upstream_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["upstream", "--port", "0", "--first-token-delay", "0.25", "--azure-content-filter"]
    )
    server = upstream_from_args(args)
    assert (server.first_token_delay, server.content_filter) == (0.25, True)
    default = upstream_from_args(parser.parse_args(["upstream"]))
    assert (default.first_token_delay, default.content_filter) == (0.0, False)
    assert (default.tokens, default.token_delay, default.port) == (12, 0.02, 8400)


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
    """`python -m chunkwatch_lab.upstream` in its own process (50 tokens, 20 ms apart)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chunkwatch_lab.upstream",
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
