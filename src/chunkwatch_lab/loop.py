"""One asyncio event loop in one background thread, shared by every request.

The seed service created a new thread and a new event loop per request. That
pattern is fragile: the model client (``AsyncOpenAI`` over an ``httpx2``
connection pool, which langchain-openai caches process-wide) is bound to the
loop it first ran on, and reusing it from the next request's loop fails with
``RuntimeError: Event loop is closed`` (or, on old SDKs, silently re-sends).
It also pays thread and loop start-up on every request and cannot reuse
upstream connections. One long-lived loop avoids all three; each request is a
task on it, cancelled when its client goes away.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["AgentLoop"]

T = TypeVar("T")


class AgentLoop:
    """Runs coroutines on a private event loop in a daemon thread.

    Fork-safe: a thread does not survive ``fork()``, so a process forked after the
    loop started (gunicorn ``--preload``) gets a new loop and thread on its first
    :meth:`submit`, instead of queueing tasks on a loop nothing runs.
    """

    def __init__(self, name: str = "chunkwatch-agent-loop") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` as a task; cancelling the returned future cancels the task."""
        if self._pid != os.getpid():  # forked: the parent's thread does not exist here
            with self._lock:
                if self._pid != os.getpid():
                    self._start()
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs, stop the loop and join the thread. Idempotent."""
        if self.loop.is_closed():
            return
        if self._thread.is_alive():

            async def _shutdown() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                # Close the async generators left suspended (an SDK stream abandoned after
                # an error) here, on their loop, not later in whatever thread GC runs.
                await asyncio.get_running_loop().shutdown_asyncgens()

            try:
                self.submit(_shutdown()).result(timeout)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
