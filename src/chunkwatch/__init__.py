"""chunkwatch: make every layer of an LLM streaming service say what it saw.

See the README for the two-minute tour and ``docs/`` for the reference.
"""

from __future__ import annotations

from chunkwatch.client_errors import error_payload
from chunkwatch.errors import StreamEmptyError, StreamStalledError, StreamTruncatedError
from chunkwatch.guard import BreakerConfig, Guard
from chunkwatch.instrumentation import instrument, uninstrument
from chunkwatch.ledger import Ledger, Tally, bind, current_ledger
from chunkwatch.outcomes import End, Outcome, classify
from chunkwatch.probes.http_in import ChunkwatchMiddleware, request_ledger
from chunkwatch.probes.queue import WatchedQueue
from chunkwatch.probes.sse_out import SSEBody
from chunkwatch.runtime import Runtime
from chunkwatch.verdict import Verdict
from chunkwatch.watchdog import Deadlines

__version__ = "0.1.0"

__all__ = [
    "BreakerConfig",
    "ChunkwatchMiddleware",
    "Deadlines",
    "End",
    "Guard",
    "Ledger",
    "Outcome",
    "Runtime",
    "SSEBody",
    "StreamEmptyError",
    "StreamStalledError",
    "StreamTruncatedError",
    "Tally",
    "Verdict",
    "WatchedQueue",
    "__version__",
    "bind",
    "classify",
    "current_ledger",
    "error_payload",
    "instrument",
    "request_ledger",
    "uninstrument",
]
