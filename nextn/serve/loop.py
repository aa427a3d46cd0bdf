"""The server's decode loop: one asyncio task drives the step engine for every request.

Handlers never touch the engine. They submit a `Ticket` (refused with 429 when the queue is full) and
read its events; the driver, between two steps and on the event loop's thread, adds submitted requests
to the engine and cancels abandoned ones, then runs one engine step on a single worker thread (ONNX
Runtime releases the GIL, so HTTP keeps being served meanwhile) and hands each sequence's new final
tokens to its ticket. A client that goes away marks its ticket cancelled; the driver frees its slot
before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nextn.errors import NextnError
from nextn.runtime.engine import Request, Sequence, StepEngine
from nextn.serve.metrics import ServerMetrics
from nextn.serve.protocol import APIError

log = logging.getLogger(__name__)


@dataclass
class Event:
    """What a request got from one step: new final tokens; on the last event, why it ended and its stats."""

    token_ids: list[int]
    finish_reason: str | None = None
    stats: dict | None = None
    error: APIError | None = None


class Ticket:
    """One request's way through the server."""

    def __init__(self, request: Request):
        self.request = request
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.seq: Sequence | None = None
        self.arrival = time.perf_counter()
        self.last_token: float | None = None  # when tokens last arrived
        self.cancelled = False
        self.done = False  # its last event is sent (set by the loop)

    async def stream(self) -> AsyncIterator[Event]:
        """Events until the last one (an error event raises its APIError)."""
        while True:
            ev = await self.events.get()
            if ev.error is not None:
                raise ev.error
            yield ev
            if ev.finish_reason is not None:
                return


class EngineLoop:
    def __init__(self, engine: StepEngine, max_queue: int, metrics: ServerMetrics):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self.pending: list[Ticket] = []  # submitted, not in the engine yet
        self.live: dict[int, Ticket] = {}  # id(sequence) -> ticket, while the engine holds it
        self.wake = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="nextn-engine")  # the engine's one thread

    @property
    def waiting(self) -> int:
        """Requests not decoding yet (submitted or queued in the engine)."""
        return len(self.pending) + len(self.engine.queued)

    def submit(self, request: Request) -> Ticket:
        """Queue a request; 429 when every batch slot is taken and max_queue requests already wait."""
        if self.engine.active + self.waiting >= self.engine.max_batch + self.max_queue:
            raise APIError(429, f"the server's queue is full ({self.max_queue} waiting requests); retry later",
                           type="rate_limit_exceeded", headers={"Retry-After": "1"})  # fmt: skip
        ticket = Ticket(request)
        self.pending.append(ticket)
        self.wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: the driver frees the sequence's slot before the next step."""
        if not ticket.done:
            ticket.cancelled = True
            self.wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._admit()
            self._gauges()
            if not self.engine.has_work:
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                touched = await loop.run_in_executor(self.executor, self.engine.step)
            except Exception:  # a bug in nextn: fail the requests in flight, keep serving the next ones
                log.exception("engine step failed")
                self._fail_all()
                continue
            self._dispatch(touched)

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    # -- between steps -----------------------------------------------------------------------------
    def _admit(self) -> None:
        pending, self.pending = self.pending, []
        for t in pending:
            if t.cancelled:
                continue
            try:
                t.seq = self.engine.add(t.request)
            except NextnError as e:  # checked at submission already; a request the engine still refuses
                t.done = True
                t.events.put_nowait(Event([], error=APIError(400, str(e))))
                continue
            self.live[id(t.seq)] = t
        for t in [t for t in self.live.values() if t.cancelled]:
            self.engine.cancel(t.seq)
            self._finished(t, t.seq)

    def _dispatch(self, touched: list[Sequence]) -> None:
        now = time.perf_counter()
        for seq in touched:
            t = self.live.get(id(seq))
            if t is None:
                continue
            ids = seq.take()
            if ids:
                m, name = self.metrics, self.metrics.name
                if t.last_token is None:
                    m.ttft.labels(name).observe(now - t.arrival)
                    per_token, rest = None, len(ids) - 1
                else:
                    per_token, rest = (now - t.last_token) / len(ids), len(ids)
                if per_token is not None:
                    for _ in range(rest):
                        m.itl.labels(name).observe(per_token)
                t.last_token = now
            if seq.finished:
                self._finished(t, seq, ids)
            elif ids:
                t.events.put_nowait(Event(ids))

    def _finished(self, t: Ticket, seq: Sequence, ids: list[int] | None = None) -> None:
        self.live.pop(id(seq), None)
        stats = seq.stats.to_dict()
        self.metrics.finished(seq.finish_reason, stats, seq.stats.accepted_per_position)
        self.metrics.e2e.labels(self.metrics.name).observe(time.perf_counter() - t.arrival)
        t.done = True
        t.events.put_nowait(Event(ids or [], seq.finish_reason, stats))

    def _fail_all(self) -> None:
        for t in list(self.live.values()):
            self.engine.cancel(t.seq)
            self.live.pop(id(t.seq), None)
            t.done = True
            t.events.put_nowait(Event([], error=APIError(500, "internal error while decoding", type="server_error")))

    def _gauges(self) -> None:
        self.metrics.running.labels(self.metrics.name).set(self.engine.active)
        self.metrics.waiting.labels(self.metrics.name).set(self.waiting)
