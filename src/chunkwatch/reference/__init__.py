"""The runnable reference system: a local model endpoint (``upstream``), a
fault-injecting reverse proxy (``gateway``) and the service they serve, on loopback."""
