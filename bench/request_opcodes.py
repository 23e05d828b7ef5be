"""Bytecodes chunkwatch executes per request, by the chunkwatch function responsible:
where the per-request fixed cost is, deterministic and in seconds.

``bench/instructions.py`` counts a request's instructions under callgrind, which cannot
name a Python function; ``bench/request_calls.py`` counts calls, which weigh a one-line
call like a hundred-line one. This counts the bytecodes executed (``f_trace_opcodes``),
each given to the innermost chunkwatch function on its stack — its own, and those of
the OpenTelemetry, prometheus_client, wrapt and standard-library code it called — and to
nobody when a frame of the host (the service, LangGraph, openai, httpx, Flask) is
nearer: the host's own work under a wrapping probe is not chunkwatch's. C work (dict and
lock operations, clocks) is not a bytecode, so this ranks rather than sums instructions.

The in-process reference service (tokens mode, guard off) answers ``--requests``
one-token chats from the local upstream, as ``bench/request_calls.py``.

    uv run python bench/request_opcodes.py [--requests 20] [--top 40]
"""

import argparse
import collections
import sys
import threading
from types import FrameType
from typing import Any

from request_calls import hooked_chats, print_ranked  # bench/ is the script's directory

# Whose code a file is: ours (a label), the host's (None), or neutral (look further up).
NEUTRAL = ("/opentelemetry/", "/prometheus_client/", "/wrapt/", "/python3.11/")
HOST = ("/site-packages/",)  # any other installed package is the host's
_OURS = "/src/chunkwatch/"
_NOBODY = ""


def label_of(frame: FrameType | None, known: dict[int, str]) -> str:
    """The chunkwatch function responsible for ``frame``'s bytecodes, or ``_NOBODY``."""
    if frame is None:
        return _NOBODY
    got = known.get(id(frame))
    if got is not None:
        return got
    code = frame.f_code
    path = code.co_filename
    if _OURS in path:
        label = path.split("/src/")[-1] + ":" + code.co_qualname
    elif "/chunkwatch_lab/" in path or "/bench/" in path:
        label = _NOBODY
    elif any(part in path for part in NEUTRAL) and "/site-packages/" not in path.replace(
        "/site-packages/opentelemetry/", ""
    ).replace("/site-packages/prometheus_client/", "").replace("/site-packages/wrapt/", ""):
        label = label_of(frame.f_back, known)
    elif any(part in path for part in HOST):
        label = _NOBODY
    else:
        label = label_of(frame.f_back, known)  # frozen modules, <string>: look further up
    known[id(frame)] = label
    return label


def count_opcodes(requests: int) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    client = threading.get_ident()
    known: dict[int, str] = {}

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            counts[known.get(id(frame)) or label_of(frame, known)] += 1
        elif event == "call":
            known.pop(id(frame), None)  # a new frame may reuse a dead one's id
            if threading.get_ident() == client:
                return None
            frame.f_trace_opcodes = True
        elif event == "return":
            known.pop(id(frame), None)
        return tracer

    hooked_chats(requests, tracer, threading.settrace, sys.settrace)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    counts = count_opcodes(args.requests)
    n = args.requests
    ours = {k: v for k, v in counts.items() if k}
    print(
        f"bytecodes a request: chunkwatch {sum(ours.values()) / n:.0f}, "
        f"host {counts[_NOBODY] / n:.0f}\n"
    )
    print_ranked(collections.Counter(ours), n, args.top)


if __name__ == "__main__":
    main()
