"""Patching that stacks with other instrumentations, and unstacks in any order.

OpenTelemetry's contrib instrumentations (httpx / httpx2, threading, openai-v2 …)
wrap the same methods chunkwatch hooks, with ``wrapt`` proxies, and undo it with
``opentelemetry.instrumentation.utils.unwrap`` — which removes whatever proxy is on
top of the class attribute. So chunkwatch always sits **beneath** such proxies:

* :func:`patch` walks down the chain of ``wrapt`` proxies on ``cls.name`` and puts
  its wrapper under the lowest one (by setting that proxy's ``__wrapped__``, which
  wrapt supports); with no proxy there, it replaces the attribute. Whatever order
  the tools were installed in, the call order is the same: their proxies, then
  chunkwatch, then the library's own method — so an OpenTelemetry HTTP client span
  is always current when the gateway probe runs, and ``unwrap`` by the other tool
  removes its own proxy, never ours.
* :func:`unpatch` takes chunkwatch's wrapper out of the chain wherever it is, and
  never removes a wrapper that is not chunkwatch's. If someone replaced the
  attribute with a plain function that captured ours (we cannot reach into it), our
  wrapper stays in place, inert: every probe checks for an active runtime first.
* The wrapper is a plain function carrying the original's name, signature and
  docstring (``functools.wraps``), so ``help()`` and ``inspect`` show the library's.
* What was replaced is called as a method of the instance (``wrapt`` proxies and
  other descriptors bind themselves), never as an unbound function.

Checked with wrapt 1.16 and 2.x.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from types import FunctionType
from typing import Any

__all__ = ["is_patched", "patch", "unpatch"]

_MARK = "__chunkwatch_original__"
_OWNER_MARK = "__chunkwatch_owner__"
_INHERITED = object()  # restored by deleting the class's own attribute
_patched: dict[str, list[tuple[type, str, Any, Any]]] = {}  # owner -> (cls, name, ours, restore)
_lock = threading.Lock()


def _proxy_types() -> tuple[type, ...]:
    try:
        import wrapt
    except ImportError:  # nobody can have wrapped with it
        return ()
    base = getattr(wrapt, "BaseObjectProxy", None) or wrapt.ObjectProxy
    return (base,)


def _is_ours(obj: Any) -> bool:
    # type(), not isinstance(): a wrapt proxy passes isinstance checks for what it wraps,
    # and forwards attribute reads to it.
    return type(obj) is FunctionType and _MARK in obj.__dict__


def _walk(cls: type, name: str) -> Iterator[tuple[Any, Any]]:
    """``(holder, node)`` down ``cls.name``'s chain, as found in the class dict: each wrapt
    proxy, then what the lowest one wraps (``holder`` is the proxy above, None at the top).
    The walk stops at chunkwatch's own wrapper or at the first object that is not a proxy."""
    proxies = _proxy_types()
    holder, node = None, cls.__dict__.get(name)
    for _ in range(32):  # a chain longer than any real stack of instrumentations: stop
        yield holder, node
        if _is_ours(node) or not proxies or not isinstance(node, proxies):
            return
        inner = getattr(node, "__wrapped__", None)
        if inner is None:
            return
        holder, node = node, inner


def _chain(cls: type, name: str) -> tuple[Any, Any]:
    """``(lowest proxy or None, what it wraps)``: where chunkwatch's wrapper goes."""
    *_, last = _walk(cls, name)
    return last


def _find_ours(cls: type, name: str, owner: str) -> tuple[Any, Any] | None:
    """``(holder, ours)``: ``owner``'s wrapper in the chain and the proxy above it."""
    for holder, node in _walk(cls, name):
        if _is_ours(node) and getattr(node, _OWNER_MARK, None) == owner:
            return holder, node
    return None


def patch(
    owner: str, cls: type, name: str, make: Callable[[Any], Any], *, inherited: bool = False
) -> bool:
    """Put ``make(original)`` in the place of ``cls.name`` beneath any wrapt proxies, unless
    ``owner`` already did. True if patched now.

    ``make(original)`` returns ``wrapper(self, *args, **kwargs)``; ``original`` is called as
    ``original(self, ...)`` (it is always the library's own function or a plain descriptor
    bound by :func:`call_original`'s rules). ``inherited``: ``cls`` may inherit ``name``
    from a base class; the patch is then set on ``cls`` alone (the base and its other
    subclasses keep theirs) and undone by deleting it."""
    with _lock:
        if _find_ours(cls, name, owner) is not None:
            return False
        holder, original = _chain(cls, name)
        restore = original
        if original is None and holder is None and inherited:
            original, restore = getattr(cls, name, None), _INHERITED
        if original is None:
            return False
        wrapper = make(_as_method(original))
        try:
            functools.update_wrapper(wrapper, original)
        except (AttributeError, TypeError):
            pass
        setattr(wrapper, _MARK, original)
        setattr(wrapper, _OWNER_MARK, owner)
        if holder is None:
            setattr(cls, name, wrapper)
        else:
            holder.__wrapped__ = wrapper
            restore = original
        _patched.setdefault(owner, []).append((cls, name, wrapper, restore))
        return True


def _as_method(original: Any) -> Any:
    """``original`` callable as ``f(self, *args, **kwargs)``: a plain function is that
    already; any other descriptor is bound to the instance first."""
    if type(original) is FunctionType or not hasattr(original, "__get__"):
        return original

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return original.__get__(self, type(self))(*args, **kwargs)

    return call


def unpatch(owner: str) -> None:
    """Take every wrapper of ``owner`` out of its chain, newest first."""
    with _lock:
        for cls, name, wrapper, restore in reversed(_patched.pop(owner, [])):
            found = _find_ours(cls, name, owner)
            if found is None or found[1] is not wrapper:
                continue  # replaced by something that is not a proxy: left in place, inert
            holder, _ = found
            if holder is not None:
                holder.__wrapped__ = getattr(wrapper, _MARK)
            elif restore is _INHERITED:
                delattr(cls, name)
            else:
                setattr(cls, name, restore)


def is_patched(cls: type, name: str) -> bool:
    """True if any chunkwatch wrapper is in ``cls.name``'s chain."""
    return any(_is_ours(node) for _, node in _walk(cls, name))
