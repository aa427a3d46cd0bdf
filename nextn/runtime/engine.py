"""The step engine: one decode loop over a changing set of sequences (vLLM's scheduler, in small).

Every caller decodes through it: `generate` with one prompt or a list, streaming, the cost calibration,
and the server (serve/), which adds and cancels sequences between steps.

    engine = StepEngine(decoder, max_batch=16)
    seq = engine.add(Request(prompt_ids, max_new_tokens=64))
    while engine.has_work:
        for s in engine.step():            # the sequences that got final tokens or finished
            print(s.take(), s.finish_reason)

A step:
    admit    queued sequences start (up to max_batch at once); each gets its caches (decoder._State,
             reused from finished sequences)
    prefill  prompt chunks, at most `prefill_chunk` prompt tokens per step over all starting sequences,
             in one trunk pass (a long prompt takes several steps, so it never stalls the running ones for
             more than one chunk); a sequence whose prompt is done samples its first token and joins the
             running set
    decode   one trunk pass for every running sequence: each drafts its K tokens with its own MTP caches
             (a fixed K is that row's own; draft="auto": the controller picks the pass's width from those
             rows' acceptance, since the pass costs its widest row, and each row drafts that many or fewer by
             its own acceptance against its own MTP calls' cost), the trunk verifies
             [t_n, d_1 .. d_K] of every row at its own positions, each row accepts its own prefix
    finish   EOS, a stop string, the token budget or a cancel: the sequence leaves, its caches go back to
             the pool

Each sequence keeps its own compact caches ([1, max_len, R] per layer, decoder.py), so a row joining or
leaving moves nothing. A pass over one row feeds zero-copy views of them; a pass over b rows gathers the
pasts into [b, P, R] (P: the longest row; a shorter row's missing slots are masked, positions explicit)
and scatters the new entries back. Each row's output is that of decoding it alone (greedy: token for
token; sampling: its own generator, seeded from its request).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nextn.runtime.controller import DraftController, SequenceAcceptance
from nextn.runtime.costs import cost_batch
from nextn.runtime.decoder import AUTO, Decoder, _State
from nextn.runtime.sampling import AcceptRule, SamplingParams, accept_drafts, sample, target_probs


@dataclass(frozen=True)
class Request:
    """What one sequence asks for (token ids in, token ids out)."""

    prompt: list[int]
    max_new_tokens: int
    draft: int | str = AUTO
    params: SamplingParams = SamplingParams()
    eos_ids: tuple[int, ...] = ()
    stop: Callable[[list[int]], int | None] | None = None  # new ids -> cut position if a stop string matched
    accept: AcceptRule = AcceptRule()


class Sequence:
    """One request inside the engine: its caches, its stats, the tokens it has produced."""

    def __init__(self, engine: StepEngine, request: Request):
        dec = engine.dec
        self.request = request
        self.budget = min(request.max_new_tokens, dec.max_positions - len(request.prompt))
        self.depth = dec.depth(request.draft)
        self.stats = dec.new_stats(len(request.prompt), request.draft, request.accept)
        self.rng = np.random.default_rng(request.params.seed)
        self.acceptance = (SequenceAcceptance(dec.acceptance_prior())
                           if request.draft == AUTO and self.depth else None)  # fmt: skip
        self.state: _State | None = None  # caches, from admission on
        self.prefilled = 0  # prompt tokens already in the trunk
        self.new: list[int] = []  # generated so far (may run past a stop string until the step ends)
        self.taken = 0  # final tokens already handed out by take()
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled"
        self.prefill_trunk_ms = 0.0
        self.t0 = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def left(self) -> int:
        """Tokens still wanted."""
        return self.budget - len(self.new)

    def final(self) -> list[int]:
        """The tokens that are final: never a token past EOS, a stop string or the budget."""
        r = self.request
        return Decoder._truncate(self.new, self.budget, r.eos_ids, r.stop)

    def take(self) -> list[int]:
        """The final tokens not handed out yet."""
        out = self.final()[self.taken :]
        self.taken += len(out)
        return out

    def ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3


class StepEngine:
    """Decodes every sequence added to it, one step at a time."""

    def __init__(self, dec: Decoder, max_batch: int = 64, prefill_chunk: int | None = None):
        self.dec = dec
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk or dec.prefill_chunk
        self.queued: deque[Sequence] = deque()  # added, not started
        self.starting: list[Sequence] = []  # prompt being prefilled
        self.running: list[Sequence] = []  # decoding
        self.controller: DraftController | None = None  # draft="auto" rows share one (one K per pass)
        self._pool: list[_State] = []  # caches of finished sequences, for the next ones

    # -- the set of sequences ----------------------------------------------------------------------
    def add(self, request: Request) -> Sequence:
        """Queue a request (checked first: a bad one raises NextnError and changes nothing)."""
        self.dec.check([request.prompt], request.draft, request.params, request.accept)
        seq = Sequence(self, request)
        if seq.acceptance is not None and self.controller is None:
            self.controller = self.dec.controller(1)
        self.queued.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence now (between steps); its caches go back to the pool."""
        if not seq.finished:
            self._finish(seq, "cancelled")

    @property
    def has_work(self) -> bool:
        return bool(self.queued or self.starting or self.running)

    @property
    def active(self) -> int:
        return len(self.starting) + len(self.running)

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Admit, prefill one budget of prompt tokens, decode one pass. -> the sequences that have new
        final tokens (take()) or finished."""
        touched: list[Sequence] = []
        while self.queued and self.active < self.max_batch:
            seq = self.queued.popleft()
            seq.state = self._caches(len(seq.request.prompt) + seq.budget + seq.depth + 2)
            seq.state.tokens = list(seq.request.prompt)
            self.starting.append(seq)
        prefilled = bool(self.starting)
        if prefilled:
            self._prefill(touched)
        if self.running:
            self._decode(list(self.running), touched, observe=not prefilled)
        return list(dict.fromkeys(touched))

    def _prefill(self, touched: list[Sequence]) -> None:
        """The next chunk of each starting sequence's prompt, at most prefill_chunk tokens over all of
        them, in one trunk pass (rows of different lengths padded and masked)."""
        budget, rows, chunks = self.prefill_chunk, [], []
        for seq in self.starting:
            if budget <= 0:
                break
            chunk = seq.request.prompt[seq.prefilled : seq.prefilled + budget]
            rows.append(seq)
            chunks.append(chunk)
            budget -= len(chunk)
        logits = self.dec.trunk_rows([s.state for s in rows], chunks, [s.stats for s in rows])  # [S, V] per row
        for seq, chunk, lg in zip(rows, chunks, logits):
            seq.prefilled += len(chunk)
            if seq.prefilled == len(seq.request.prompt):
                self._first_token(seq, lg[-1])
                touched.append(seq)

    def _first_token(self, seq: Sequence, logits) -> None:
        """The prompt is in: sample the first new token; the sequence joins the running set."""
        p = seq.request.params
        first = int(logits.argmax()) if p.greedy else sample(target_probs(logits[None], p)[0], seq.rng)
        seq.state.tokens.append(first)
        seq.new.append(first)
        seq.stats.ttft_ms = seq.ms()
        seq.prefill_trunk_ms = seq.stats.trunk_ms
        self.starting.remove(seq)
        self.running.append(seq)
        self._maybe_finish(seq, 1)

    def _decode(self, rows: list[Sequence], touched: list[Sequence], observe: bool) -> None:
        """One trunk pass over `rows`: draft, verify, accept per row."""
        t = time.perf_counter()
        dec = self.dec
        ks, choice, steady = self._depths(rows)  # K per row
        states = [seq.state for seq in rows]  # a row that finishes in this step gives its caches back
        drafts = [dec.draft(st, k, seq.stats) if k else [] for seq, st, k in zip(rows, states, ks)]
        starts = [st.n for st in states]
        tokens = [[st.tokens[st.n], *d] for st, d in zip(states, drafts)]
        logits = dec.trunk_rows(states, tokens, [s.stats for s in rows])
        for seq, d, lg, n in zip(rows, drafts, logits, starts):
            r = seq.request
            a, tok = accept_drafts(lg, d, r.params, seq.rng, r.accept)
            seq.state.n = n + a + 1  # roll back the rejected drafts' cache slots
            step_tokens = [*d[:a], tok]
            seq.state.tokens += step_tokens
            seq.new += step_tokens
            seq.stats.record_step(len(d), a, seq.ms())
            if seq.acceptance is not None:
                seq.acceptance.observe(len(d), a)
            touched.append(seq)
            self._maybe_finish(seq, len(step_tokens))
        if choice is not None and observe and steady:  # the controller's costs, from steps that tell them
            dec.costs().observe(cost_batch(len(rows)), choice.k, (time.perf_counter() - t) * 1e3)
        elif choice is None and observe and dec.has_costs and not any(ks):
            # Plain steps at a fixed K = 0 cost what auto's plain steps do: they keep the level current
            # (costs.py) where auto rows run between them (a bench's rounds, a server's mixed requests).
            if all([dec.steady(st, 0) for st in states]):  # a list: every row notes its K
                dec.costs().observe(cost_batch(len(rows)), 0, (time.perf_counter() - t) * 1e3)

    def _depths(self, rows: list[Sequence]):
        """K per row for this pass: a fixed K is the row's own; draft="auto" rows share the controller's
        choice of the pass's width (it costs its widest row) from all their acceptance estimates, and each
        takes that many drafts or fewer by its own estimate (controller.row_depth). Never past a row's
        token budget."""
        auto = [seq for seq in rows if seq.acceptance is not None]
        choice, steady = None, False
        if auto:
            ctrl = self.controller
            ctrl.rows = [seq.acceptance for seq in auto]
            states = [seq.state for seq in auto]
            choice = ctrl.choose(None, max(seq.left for seq in auto),
                                 lambda k: all(self.dec.ready(st, k) for st in states), cost_batch(len(rows)))  # fmt: skip
            for seq in auto:
                seq.stats.record_choice(choice, len(auto))
            # every row notes K (decoder.steady); only an all-auto pass at one K tells what such a pass costs
            steady = all([self.dec.steady(st, choice.k) for st in states]) and not choice.probe
            steady = steady and len(auto) == len(rows)
        ks = []
        for seq in rows:
            if seq.acceptance is None:
                k = seq.depth
            else:  # the pass's K, or fewer where this row's own acceptance does not pay for its MTP calls
                k = self.controller.row_depth(seq.acceptance, choice, cost_batch(len(rows))) if len(auto) > 1 else choice.k
            ks.append(min(k, seq.left))
        return ks, choice, steady

    # -- finishing ---------------------------------------------------------------------------------
    def _maybe_finish(self, seq: Sequence, tail: int) -> None:
        r = seq.request
        if self.dec._done(seq.new, seq.budget, r.eos_ids, r.stop, tail):
            final = seq.final()
            stopped = len(final) < seq.budget or (final and final[-1] in r.eos_ids)
            self._finish(seq, "stop" if stopped else "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq in self.queued:
            self.queued.remove(seq)
        for group in (self.starting, self.running):
            if seq in group:
                group.remove(seq)
        st = seq.stats
        st.new_tokens = len(seq.final())
        st.total_ms = seq.ms()
        st.decode_trunk_ms = st.trunk_ms - seq.prefill_trunk_ms
        if seq.state is not None:
            self._pool.append(seq.state)
            seq.state = None
            del self._pool[: -self.max_batch]  # keep as many as can run at once

    def _caches(self, max_len: int) -> _State:
        """A finished sequence's caches if one is long enough (the smallest such), else new ones."""
        fits = [st for st in self._pool if st.max_len >= max_len]
        if not fits:
            return _State(self.dec, max_len)
        st = min(fits, key=lambda s: s.max_len)
        self._pool.remove(st)
        st.reset()
        return st


def run_to_end(dec: Decoder, requests: list[Request], max_batch: int | None = None) -> list[Sequence]:
    """Decode requests together until every one has finished (generate's batch, the calibration)."""
    engine = StepEngine(dec, max_batch or max(1, len(requests)))
    seqs = [engine.add(r) for r in requests]
    while engine.has_work:
        engine.step()
    return seqs
