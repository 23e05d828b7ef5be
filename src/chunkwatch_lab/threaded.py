"""Running the reference servers: in a background thread, or in the foreground until a signal.

Usage::

    from chunkwatch_lab.threaded import start_in_thread
    from chunkwatch_lab.upstream import Upstream

    up = start_in_thread(Upstream())      # returns once the port is bound
    print(up.url)                         # http://127.0.0.1:PORT
    up.stop()                             # idempotent; joins the thread

    with start_in_thread(Upstream()) as up:   # the same, stopped on exit
        ...

``start_in_thread`` runs ``server.start()`` on a fresh event loop in a daemon
thread; the server object is then owned by that loop, so call only its
thread-safe methods (e.g. ``Gateway.set_fault``) from other threads.

:func:`run_until_signal` is what the ``chunkwatch upstream`` / ``gateway``
commands run: start, print ``chunkwatch NAME listening on URL``, stop on SIGINT
or SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from types import TracebackType
from typing import Generic, Protocol, TypeVar

__all__ = ["AsyncServer", "Running", "run_until_signal", "start_in_thread"]


class AsyncServer(Protocol):
    """What the reference servers have in common."""

    @property
    def port(self) -> int: ...

    @property
    def url(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=AsyncServer)


class Running(Generic[S]):
    """A server running on its own event loop in a daemon thread."""

    def __init__(self, server: S, loop: asyncio.AbstractEventLoop, thread: threading.Thread):
        self.server = server
        self._loop = loop
        self._thread = thread
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server, close its loop and join the thread. Safe to call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop)
            try:
                future.result(timeout)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout)

    def __enter__(self) -> Running[S]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_in_thread(server: S, *, name: str | None = None) -> Running[S]:
    """Start ``server`` on a new event loop in a daemon thread; return once it is bound.

    An error while starting (e.g. the port is taken) is raised here.
    """
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as err:
            failure.append(err)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            _cancel_leftovers(loop)
            loop.close()

    thread = threading.Thread(target=run, name=name or type(server).__name__, daemon=True)
    thread.start()
    ready.wait()
    if failure:
        thread.join()
        raise failure[0]
    return Running(server, loop, thread)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


async def run_until_signal(server: AsyncServer, name: str) -> int:
    """Start ``server``, print ``chunkwatch NAME listening on URL``, and stop it on
    SIGINT or SIGTERM. Returns the exit status (0)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"chunkwatch {name} listening on {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
    return 0
