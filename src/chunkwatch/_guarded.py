"""The guarded model: the runnable :meth:`chunkwatch.guard.Guard.wrap` returns."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig

from chunkwatch.guard import Guard, current_scope, fallback_attributes, own_ledger
from chunkwatch.ledger import current_ledger
from chunkwatch.runtime import active

__all__ = ["GuardedModel", "buffered_twin"]


def buffered_twin(model: Any) -> Any:
    """The same model (and bound tools) with streaming off: ``streaming=False`` (so the
    payload says ``stream: false``) and ``disable_streaming=True`` (so callbacks that
    ask for streaming, like ``astream_events``', do not turn it back on)."""
    if isinstance(model, RunnableBinding):
        twin = buffered_twin(model.bound).bind(**model.kwargs)
        return twin.with_config(model.config) if model.config else twin
    if isinstance(model, BaseChatModel):
        update: dict[str, Any] = {"disable_streaming": True}
        if "streaming" in type(model).model_fields:
            update["streaming"] = False
        return model.model_copy(update=update)
    raise TypeError(f"the guard wraps a chat model or a bound chat model, not {type(model)!r}")


def _base_url(model: Any) -> str:
    while isinstance(model, RunnableBinding):
        model = model.bound
    for attr in ("azure_endpoint", "openai_api_base", "base_url"):
        value = getattr(model, attr, None)
        if value:
            return str(value)
    return "unknown"


class GuardedModel(Runnable[Any, Any]):
    """Calls ``inner`` (streaming); on a broken stream re-issues the call via its twin."""

    def __init__(self, *, guard: Guard, inner: Any, upstream: str | None = None) -> None:
        self.guard = guard
        self.inner = inner
        self.buffered = buffered_twin(inner)
        self._upstream = upstream

    @property
    def upstream(self) -> str:
        if self._upstream is not None:
            return self._upstream
        rt = active()
        url = _base_url(self.inner)
        return rt.upstream_for(url) if rt is not None else url

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        scope = current_scope()
        if scope is not None and scope.mode == "updates":
            return self.buffered.invoke(input, config, **kwargs)
        with own_ledger():
            ledger = current_ledger()
            since = len(ledger.tallies) if ledger is not None else 0
            try:
                result = self.inner.invoke(input, config, **kwargs)
            except Exception as exc:
                reason = self._fall_back(exc, since)
                with fallback_attributes(reason):
                    result = self.buffered.invoke(input, config, **kwargs)
                self.guard.failed(self.upstream, reason)  # streaming broke where buffered works
                return result
        self.guard.succeeded(self.upstream)
        return result

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        scope = current_scope()
        if scope is not None and scope.mode == "updates":
            return await self.buffered.ainvoke(input, config, **kwargs)
        with own_ledger():
            ledger = current_ledger()
            since = len(ledger.tallies) if ledger is not None else 0
            try:
                result = await self.inner.ainvoke(input, config, **kwargs)
            except Exception as exc:
                reason = self._fall_back(exc, since)
                with fallback_attributes(reason):
                    result = await self.buffered.ainvoke(input, config, **kwargs)
                self.guard.failed(self.upstream, reason)  # streaming broke where buffered works
                return result
        self.guard.succeeded(self.upstream)
        return result

    def _fall_back(self, exc: Exception, since: int) -> str:
        """Decide; re-raise ``exc`` unchanged when the guard must not re-issue."""
        reason = self.guard.fallback_reason(exc, current_ledger(), since)
        if reason is None:
            raise exc
        upstream = self.upstream
        self.guard.record_fallback(upstream, reason)
        scope = current_scope()
        if scope is not None:
            scope.switch(reason)
        return reason
