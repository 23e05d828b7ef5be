"""chunkwatch's patches stack with wrapt-based instrumentations and unstack in any order."""

from __future__ import annotations

import inspect
from itertools import permutations
from typing import Any

import pytest
import wrapt
from opentelemetry.instrumentation.utils import unwrap

from chunkwatch.patching import is_patched, patch, unpatch

OWNER = "test.stacking"


def _make_target() -> type:
    class Target:
        def call(self, x: int, *, scale: int = 1) -> list[str]:
            """The library's own method."""
            return [f"lib:{x * scale}"]

    return Target


def _ours(original: Any) -> Any:
    def call(self: Any, x: int, **kwargs: Any) -> list[str]:
        return ["chunkwatch", *original(self, x, **kwargs)]

    return call


def _theirs(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> list[str]:
    return ["otel", *wrapped(*args, **kwargs)]


def _install(cls: type, who: str) -> None:
    if who == "ours":
        patch(OWNER, cls, "call", _ours)
    else:
        wrapt.wrap_function_wrapper(cls, "call", _theirs)


def _remove(cls: type, who: str) -> None:
    if who == "ours":
        unpatch(OWNER)
    else:
        unwrap(cls, "call")  # what OpenTelemetry's instrumentors call in _uninstrument


@pytest.mark.parametrize("order", list(permutations(["ours", "theirs"])))
def test_the_call_order_is_the_same_whichever_tool_came_first(order: tuple[str, str]) -> None:
    """Other tools' wrapt proxies run first, then chunkwatch, then the library, in both
    install orders: chunkwatch always sits beneath, where the HTTP client span is current."""
    cls = _make_target()
    for who in order:
        _install(cls, who)
    try:
        assert cls().call(2, scale=3) == ["otel", "chunkwatch", "lib:6"]
    finally:
        unpatch(OWNER)


@pytest.mark.parametrize("install", list(permutations(["ours", "theirs"])))
@pytest.mark.parametrize("remove", list(permutations(["ours", "theirs"])))
def test_removing_either_tool_leaves_the_other_working(
    install: tuple[str, str], remove: tuple[str, str]
) -> None:
    """Uninstrumenting one tool, in any order, removes that tool's wrapper only; after
    both, the class has the library's own function back."""
    cls = _make_target()
    original = cls.__dict__["call"]
    for who in install:
        _install(cls, who)
    first, second = remove
    _remove(cls, first)
    left = "otel" if first == "ours" else "chunkwatch"
    assert cls().call(1) == [left, "lib:1"]
    assert is_patched(cls, "call") == (first != "ours")
    _remove(cls, second)
    assert cls().call(1) == ["lib:1"]
    assert cls.__dict__["call"] is original


def test_patching_twice_is_idempotent_even_beneath_a_proxy() -> None:
    """A second patch by the same owner finds its wrapper in the chain and adds none."""
    cls = _make_target()
    patch(OWNER, cls, "call", _ours)
    wrapt.wrap_function_wrapper(cls, "call", _theirs)
    try:
        assert patch(OWNER, cls, "call", _ours) is False
        assert cls().call(1) == ["otel", "chunkwatch", "lib:1"]
    finally:
        unpatch(OWNER)
        unwrap(cls, "call")


def test_the_wrapper_keeps_the_library_functions_name_signature_and_doc() -> None:
    """help() and inspect show the library's method, not ``(self, *args, **kwargs)``."""
    cls = _make_target()
    original = cls.__dict__["call"]
    patch(OWNER, cls, "call", _ours)
    try:
        patched = cls.__dict__["call"]
        assert patched.__name__ == "call"
        assert patched.__doc__ == "The library's own method."
        assert inspect.signature(patched) == inspect.signature(original)
        assert patched.__wrapped__ is original
    finally:
        unpatch(OWNER)


def test_a_plain_function_wrapper_installed_over_ours_is_never_removed() -> None:
    """If another tool replaced the attribute with a plain function that calls ours,
    unpatch leaves it (and ours under it) in place: removing it would strip that tool."""
    cls = _make_target()
    patch(OWNER, cls, "call", _ours)
    inner = cls.__dict__["call"]

    def theirs(self: Any, x: int, **kwargs: Any) -> list[str]:
        return ["plain", *inner(self, x, **kwargs)]

    cls.call = theirs  # type: ignore[attr-defined]
    unpatch(OWNER)
    assert cls.__dict__["call"] is theirs
    assert cls().call(1) == ["plain", "chunkwatch", "lib:1"]
