"""Following a request across the hand-offs real services use, without user code.

A model call finds its request's :class:`~chunkwatch.ledger.Ledger` through a
context variable that the ``http`` probe sets while the view runs and while the
response body is iterated. Context variables already flow into asyncio tasks,
including those submitted with ``asyncio.run_coroutine_threadsafe`` /
``loop.call_soon_threadsafe`` from the request thread (they copy the caller's
context) and ``asyncio.to_thread``. They do not flow into threads or executor
workers; this module makes them, as OpenTelemetry's threading instrumentation
does for the trace context:

* ``threading.Thread.start`` — a thread started while a request's ledger is
  current runs its ``run`` inside :func:`chunkwatch.bind` of that ledger (a thread
  per request running ``asyncio.run(...)`` or its own loop, and subclasses that
  override ``run``).
* ``concurrent.futures.ThreadPoolExecutor.submit`` — a function submitted while a
  ledger is current runs inside ``bind`` of it (``loop.run_in_executor`` submits
  through it).

Only the ledger (and, through ``bind``, the request's trace context) travels: the
caller's other context variables do not. A thread that outlives its request (one
started lazily by the first request and kept) stops recording into that request
when its verdict is drawn: the ledger is then closed, and later streams there are
unlinked (see :meth:`chunkwatch.runtime.Runtime.ledger`). Both patches stack with
OpenTelemetry's threading instrumentation in either order.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from threading import Thread
from typing import Any

from chunkwatch.ledger import Ledger, _current, bind
from chunkwatch.patching import patch, unpatch
from chunkwatch.runtime import active

__all__ = ["instrument", "uninstrument"]

_OWNER = "chunkwatch.handoff"


def _ledger_to_carry() -> Ledger | None:
    ledger = _current.get()  # current_ledger(), without its call: every submit asks
    if ledger is None or ledger.closed or ledger.unlinked or active() is None:
        return None
    return ledger


def _bound(ledger: Ledger, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run_bound(*args: Any, **kwargs: Any) -> Any:
        with bind(ledger):
            return fn(*args, **kwargs)

    return run_bound


def _make_start(original: Any) -> Any:
    def start(self: Thread) -> None:
        ledger = _ledger_to_carry()
        # chunkwatch's own threads (the watchdog, started by a request's first stream)
        # serve every request: they must not hold the one that happened to start them.
        if ledger is not None and not self.name.startswith("chunkwatch-"):
            # The instance's run, as it resolves now (the class's, or a subclass's,
            # through any other tool's wrapper), is what the new thread will call.
            run = self.run

            def run_bound() -> None:
                try:
                    with bind(ledger):
                        run()
                finally:  # a Thread object kept after its end does not keep the request
                    self.__dict__.pop("run", None)

            self.run = run_bound  # type: ignore[method-assign]
        return original(self)  # type: ignore[no-any-return]

    return start


def _make_submit(original: Any) -> Any:
    def submit(self: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        ledger = _ledger_to_carry()
        if ledger is not None:
            fn = _bound(ledger, fn)
        return original(self, fn, *args, **kwargs)

    return submit


def instrument() -> None:
    """Carry the current request's ledger into threads and executor workers. Idempotent."""
    patch(_OWNER, Thread, "start", _make_start)
    patch(_OWNER, ThreadPoolExecutor, "submit", _make_submit)


def uninstrument() -> None:
    unpatch(_OWNER)
