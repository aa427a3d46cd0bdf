"""`nextn serve`: an OpenAI-compatible HTTP server over the step engine (FastAPI on uvicorn).

    POST /v1/completions   prompt (text or token ids), max_tokens, temperature, top_p, top_k, seed, stop,
                           stream (server-sent events ending in `data: [DONE]`), draft ("auto" or K)
    GET  /v1/models        the one model served
    GET  /health           200 once the model is loaded and its step costs are known
    GET  /metrics          Prometheus text (metrics.py)

Every request joins the one running batch between steps (loop.py); greedy output is that of
`nextn run` on the same prompt, whatever else is in the batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from nextn.errors import NextnError
from nextn.runtime.api import Model
from nextn.runtime.engine import Request, StepEngine
from nextn.runtime.sampling import AcceptRule, SamplingParams
from nextn.serve.loop import EngineLoop, Ticket
from nextn.serve.metrics import ServerMetrics
from nextn.serve.protocol import (
    APIError,
    CompletionRequest,
    chunk_body,
    completion_body,
    completion_id,
    usage_chunk_body,
    validation_error,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model_name: str
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 64  # requests waiting for a batch slot before 429
    draft: int | str = "auto"  # for requests that do not say
    prefill_chunk: int = 256  # prompt tokens prefilled per step (a long prompt never stalls the batch longer)


def warm_up(model: Model, config: ServeConfig) -> None:
    """Measure the step costs draft="auto" needs at every batch size it will see (cached per artifact and
    machine), so no request waits for a calibration: also on a server whose --draft is a fixed K, since any
    request may ask for "auto" (a calibration inside a step would stall every sequence for seconds)."""
    model.decoder.prepare_auto(*range(1, config.max_batch + 1))


def create_app(model: Model, config: ServeConfig, on_ready=None) -> FastAPI:
    """The app; `on_ready()` is called once its decode loop runs."""
    metrics = ServerMetrics(config.model_name)
    engine = StepEngine(model.decoder, max_batch=config.max_batch, prefill_chunk=config.prefill_chunk)
    state: dict[str, EngineLoop] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["loop"] = loop = EngineLoop(engine, config.max_queue, metrics)
        task = asyncio.create_task(loop.run())
        if on_ready:
            on_ready()
        yield
        task.cancel()
        loop.close()

    app = FastAPI(title="nextn", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        err = validation_error(list(e.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.middleware("http")
    async def count(request: HTTPRequest, call_next):
        response = await call_next(request)
        metrics.http.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "replica": f"{socket.gethostname()}:{os.getpid()}"}  # which engine answered

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": int(time.time()), "owned_by": "nextn",
            "max_model_len": model.decoder.max_positions}]}  # fmt: skip

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        body.check(config.model_name)
        request = engine_request(model, body, config)
        loop = state["loop"]
        ticket = loop.submit(request)
        cid = completion_id()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(model, loop, ticket, cid, config.model_name, include_usage),
                                     media_type="text/event-stream")  # fmt: skip
        return await complete(model, loop, ticket, cid, config.model_name, http)

    return app


def engine_request(model: Model, body: CompletionRequest, config: ServeConfig) -> Request:
    """The step-engine request for a checked body; what the model refuses is a 400 naming the field."""
    draft = config.draft if body.draft is None else body.draft
    top_k = max(0, body.top_k)
    params = SamplingParams(float(body.temperature), top_k, float(body.top_p), body.seed)
    try:
        req = model.request(body.prompt_one, body.max_tokens, draft, params, body.stops, AcceptRule())
        if body.ignore_eos:
            req = dataclasses.replace(req, eos_ids=())
    except NextnError as e:
        msg = str(e)
        field = "draft" if "--draft" in msg else "stop" if "stop" in msg else "prompt"
        msg = msg.replace("--draft ", "draft ")
        raise APIError(400, msg if msg.startswith(field) else f"{field}: {msg}", field) from None
    return req


async def complete(model: Model, loop: EngineLoop, ticket: Ticket, cid: str, name: str, http: HTTPRequest):
    """Wait for the whole completion; a client that disconnects meanwhile cancels it."""
    ids = []
    try:
        while True:
            try:
                ev = await asyncio.wait_for(ticket.events.get(), timeout=0.25)  # a cancelled get loses nothing
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; the finally frees the slot
                continue
            if ev.error is not None:
                raise ev.error
            ids += ev.token_ids
            if ev.finish_reason is not None:
                break
    finally:
        loop.cancel(ticket)  # no-op once it finished
    text = model.decode(ids) or ""
    return completion_body(cid, name, text, ids, ev.finish_reason, len(ticket.request.prompt), ev.stats)


async def sse(model: Model, loop: EngineLoop, ticket: Ticket, cid: str, name: str, include_usage: bool):
    """Server-sent events: a chunk per step with new text, the last one with finish_reason, then [DONE]."""
    detok = Detokenizer(model)
    n = 0
    try:
        try:
            async for ev in ticket.stream():
                n += len(ev.token_ids)
                text = detok.add(ev.token_ids, final=ev.finish_reason is not None)
                if text or ev.finish_reason is not None:
                    yield _event(chunk_body(cid, name, text, ev.token_ids, ev.finish_reason))
        except APIError as e:
            yield _event(e.body())
        if include_usage:
            yield _event(usage_chunk_body(cid, name, len(ticket.request.prompt), n))
        yield "data: [DONE]\n\n"
    finally:
        loop.cancel(ticket)  # the client went away mid-stream: its slot is freed before the next step


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Detokenizer:
    """Text of a growing list of ids, handed out as increments; a piece ending inside a multi-byte
    character is held back until the character is complete."""

    def __init__(self, model: Model):
        self.model, self.ids, self.sent = model, [], ""

    def add(self, ids: list[int], final: bool = False) -> str:
        self.ids += ids
        if self.model.tokenizer is None:
            return ""
        text = self.model.decode(self.ids) or ""
        if (text.endswith("\ufffd") and not final) or not text.startswith(self.sent):
            return ""
        out, self.sent = text[len(self.sent) :], text
        return out


def serve(artifact: str | Path, host: str, port: int, config: ServeConfig, backend: str = "ort",
          threads: int = 0, on_ready=None) -> None:  # fmt: skip
    """Bind, load, warm up, then serve until interrupted (Ctrl-C); the step costs are saved on the way out.
    `on_ready(url)` is called once requests are answered."""
    import uvicorn

    sock = bind(host, port)  # first: a taken port fails in a second, not after loading the model
    with Model(artifact, backend=backend, threads=threads) as model:
        warm_up(model, config)
        url = f"http://{host}:{sock.getsockname()[1]}"
        app = create_app(model, config, (lambda: on_ready(url)) if on_ready else None)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        server.run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise NextnError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
