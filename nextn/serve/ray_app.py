"""`nextn serve --replicas N`: the same app as a Ray Serve deployment of N replicas.

Each replica is a Ray actor that opens the artifact, warms up its step costs and runs its own step
engine behind the same FastAPI app as `nextn serve` (app.create_app); Ray Serve's HTTP proxy listens on
--host/--port and spreads requests over the replicas. With no --ray-address a local Ray instance is
started (and stopped on exit); with one, the deployment joins that cluster. `/metrics` and `/health`
answer from the replica a request lands on (each engine counts its own requests).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from nextn.errors import NextnError
from nextn.serve.app import ServeConfig

log = logging.getLogger(__name__)

APP_NAME = "nextn"


def replica_builder(artifact: str, config: ServeConfig, backend: str, threads: int):
    """The ASGI app builder Ray Serve calls once inside each replica."""

    def build():
        from nextn.runtime.api import Model
        from nextn.serve.app import create_app, warm_up

        model = Model(artifact, backend=backend, threads=threads)
        warm_up(model, config)
        return create_app(model, config)

    return build


def serve_on_ray(artifact: str | Path, host: str, port: int, config: ServeConfig, replicas: int,
                 ray_address: str | None = None, backend: str = "ort", threads: int = 0,
                 on_ready=None) -> None:  # fmt: skip
    """Deploy N replicas, block until interrupted (Ctrl-C), then remove the deployment (and the local Ray
    instance if this call started it)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise NextnError("--replicas needs Ray Serve: pip install 'nextn[ray]'") from None
    cpus = os.cpu_count() or 1
    threads = threads or max(1, cpus // replicas)  # the replicas share this machine's cores
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING,
                     **({} if ray_address else {"num_cpus": max(cpus, replicas)}))  # fmt: skip
        except ConnectionError as e:
            raise NextnError(f"--ray-address {ray_address}: {e}") from None
    try:
        quiet = {"log_level": "WARNING"}  # Serve logs every request at INFO
        serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
        ingress = serve.ingress(replica_builder(str(Path(artifact).resolve()), config, backend, threads))()
        deployment = serve.deployment(ingress, name="nextn", num_replicas=replicas,
                                      ray_actor_options={"num_cpus": 1},
                                      max_ongoing_requests=config.max_batch + config.max_queue)  # fmt: skip
        serve.run(deployment.bind(), name=APP_NAME, route_prefix="/", blocking=False, logging_config=quiet)
        import time

        while _running(serve) < replicas:  # each replica opens the artifact and warms up before it serves
            time.sleep(0.5)
        if on_ready:
            on_ready(f"http://{host}:{port}")
        while True:
            time.sleep(1)
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()


def _running(serve) -> int:
    """Replicas of the deployment that are up."""
    app = serve.status().applications.get(APP_NAME)
    dep = app.deployments.get("nextn") if app else None
    return (dep.replica_states or {}).get("RUNNING", 0) if dep else 0
