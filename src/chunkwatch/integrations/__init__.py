"""Where chunkwatch meets a framework: one module per integration.

* :mod:`chunkwatch.integrations.flask` — the http and sse probes on a Flask app, and
  ``/metrics`` (``pip install 'chunkwatch[flask]'``).
* :mod:`chunkwatch.integrations.opentelemetry` — ``ChunkwatchInstrumentor``, the
  ``opentelemetry_instrumentor`` entry point ``opentelemetry-instrument`` loads.

Most services need neither directly: ``chunkwatch.instrument(app)`` uses them.
"""
