"""Idempotent class-attribute patching, undone exactly by :func:`unpatch`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["is_patched", "patch", "unpatch"]

_MARK = "__chunkwatch_original__"
_patched: dict[str, list[tuple[type, str, Any]]] = {}


def patch(owner: str, cls: type, name: str, make: Callable[[Any], Any]) -> bool:
    """Replace ``cls.name`` with ``make(original)`` unless already done. True if patched now."""
    original = cls.__dict__.get(name)
    if original is None or getattr(original, _MARK, None) is not None:
        return False
    wrapper = make(original)
    setattr(wrapper, _MARK, original)
    setattr(cls, name, wrapper)
    _patched.setdefault(owner, []).append((cls, name, original))
    return True


def unpatch(owner: str) -> None:
    """Restore every attribute ``owner`` patched, newest first."""
    for cls, name, original in reversed(_patched.pop(owner, [])):
        setattr(cls, name, original)


def is_patched(cls: type, name: str) -> bool:
    return getattr(cls.__dict__.get(name), _MARK, None) is not None
