"""One probe per layer, each hooking one seam of its library (see each module's docstring).

========== ======================================= =====================================
layer      seam                                    unit counted
========== ======================================= =====================================
gateway    httpx2 / httpx transport (response body) SSE ``data:`` events received
sdk        openai ``chat.completions.create``       chunks (content chunks noted)
langgraph  ``astream_events`` / ``astream``         token events or state updates
queue      :class:`~chunkwatch.probes.queue.WatchedQueue`  items got
sse        the WSGI response body                   events written
http       the WSGI app (Flask ``__call__``)        —
========== ======================================= =====================================
"""
