"""Idempotent class-attribute patching, undone exactly by :func:`unpatch`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["is_patched", "patch", "unpatch"]

_MARK = "__chunkwatch_original__"
_INHERITED = object()  # restored by deleting the class's own attribute
_patched: dict[str, list[tuple[type, str, Any]]] = {}


def patch(
    owner: str, cls: type, name: str, make: Callable[[Any], Any], *, inherited: bool = False
) -> bool:
    """Replace ``cls.name`` with ``make(original)`` unless already done. True if patched now.

    ``inherited``: ``cls`` may inherit ``name`` from a base class; the patch is then set
    on ``cls`` alone (the base and its other subclasses keep theirs) and undone by
    deleting it."""
    original = cls.__dict__.get(name)
    restore = original
    if original is None and inherited:
        original, restore = getattr(cls, name, None), _INHERITED
    if original is None or getattr(original, _MARK, None) is not None:
        return False
    wrapper = make(original)
    setattr(wrapper, _MARK, original)
    setattr(cls, name, wrapper)
    _patched.setdefault(owner, []).append((cls, name, restore))
    return True


def unpatch(owner: str) -> None:
    """Restore every attribute ``owner`` patched, newest first."""
    for cls, name, original in reversed(_patched.pop(owner, [])):
        if original is _INHERITED:
            delattr(cls, name)
        else:
            setattr(cls, name, original)


def is_patched(cls: type, name: str) -> bool:
    return getattr(cls.__dict__.get(name), _MARK, None) is not None
