"""The lab: chunkwatch's runnable reference system, apart from the library.

A local model endpoint (:mod:`~chunkwatch_lab.upstream`), a fault-injecting reverse
proxy (:mod:`~chunkwatch_lab.fault_gateway`, its faults in :mod:`~chunkwatch_lab.faults`),
the reference service they serve (:mod:`~chunkwatch_lab.service`, served by
:mod:`~chunkwatch_lab.serving` or gunicorn through :mod:`~chunkwatch_lab.wsgi`), the
demo, and the OpenTelemetry SDK set-up of our own commands
(:mod:`~chunkwatch_lab.telemetry`). All on loopback. Its dependencies are the ``lab``
extra (``pip install 'chunkwatch[lab]'``). The library (``chunkwatch``) never imports
this package; only the ``chunkwatch`` command does, for its ``demo``, ``serve``,
``gateway`` and ``upstream`` subcommands.
"""
