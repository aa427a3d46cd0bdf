"""Serving: the OpenAI-compatible HTTP server (app.py) over the step engine, its decode loop (loop.py),
its request and response bodies (protocol.py) and its Prometheus metrics (metrics.py)."""
