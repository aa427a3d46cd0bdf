"""Draft-and-verify decoding with MTP modules and latent KV caches.

One sequence's state (positions are token indices; the trunk has processed tokens 0..n-1 and token n
is pending):

    tokens      t_0 ... t_{n-1} t_n                    (prompt + generated; t_n not yet in the trunk)
    trunk       cache slots 0..n-1, hidden h_i per slot (after the final norm)
    MTP k       slot i holds (embed(t_{i+k+1}), hidden of depth k-1 at slot i), at position i+k+1;
                slots below c[k] are exact (true tokens, true hiddens), the rest are provisional

A step:
    draft   module 0 runs slots [c0, n) with tokens t_{i+1} and trunk hiddens: its last logits give d_1.
            Module k >= 1 runs slots [c_k, n) with tokens t_{i+k+1}, drafts standing in past t_n, and the
            hiddens module k-1 just produced: its last logits give d_{k+1}. Past the last module L, L runs
            again one slot further per draft on its own hidden (vLLM's and TensorRT-LLM's recursion).
    verify  the trunk runs [t_n, d_1 .. d_K] at positions n .. n+K in one pass: K+1 logit rows.
    accept  the longest prefix d_1..d_a the target agrees with (sampling.accept_drafts), then one more
            token from the target: a + 1 new tokens per trunk pass.
    commit  the trunk keeps slots up to n+a (roll back = a shorter length); MTP module k keeps its
            exact slots below n-k and recomputes the rest next step.

Caches are preallocated per sequence ([1, max_len, R] and [1, max_len, D] per layer and per module);
engines get zero-copy views of the filled prefix and return only new entries, copied into place.
K per step: fixed, or draft="auto" (controller.py: from measured step costs and acceptance). This file
holds one sequence's caches and the graph calls on them; the loop over steps, for any set of sequences,
is engine.py. Where every MTP graph runs on nextn's MtpModule kernel, a step's drafting is one call of it
(mtp_module.NativeDrafter: the same drafts as _draft_tokens, without a Python and ONNX Runtime round per draft).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from nextn.errors import NextnError
from nextn.export import io
from nextn.export.manifest import ARRAY_DTYPES
from nextn.runtime.controller import AcceptanceCounts, Choice, DraftController, SequenceAcceptance
from nextn.runtime.costs import CALIB_PROMPT, CostModel, cost_batch, cost_cache_file
from nextn.runtime.engines import Engines
from nextn.runtime.mtp_module import native_drafter
from nextn.runtime.sampling import AcceptRule, SamplingParams

AUTO = "auto"
SETTLE_STEPS = 4  # a sequence's first decode steps run cold and tell no step cost (Decoder.steady)



@dataclass
class Stats:
    """Per call. Times in milliseconds; acceptance counted per draft position."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    steps: int = 0  # trunk verify passes after prefill
    drafted: int = 0
    accepted: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    trunk_ms: float = 0.0
    decode_trunk_ms: float = 0.0  # trunk time after prefill (verify passes only)
    mtp_ms: float = 0.0
    draft_ms: float = 0.0  # wall time of drafting (MTP calls and the Python around them)
    step_end_ms: list[float] = field(default_factory=list)  # since the call started, per verify step
    step_tokens: list[int] = field(default_factory=list)  # tokens emitted by each verify step
    step_draft: list[int] = field(default_factory=list)  # K of each verify step
    draft: str = "0"  # what was asked: "auto" or a fixed K
    acceptance: str = "exact"  # or "relaxed (lossy ...)"
    # draft="auto": the controller's expectations summed over steps, and the K = 0 step it compared against
    predicted_tokens: float = 0.0
    predicted_ms: float = 0.0
    plain_step_ms: float = 0.0
    probes: int = 0

    def record_step(self, drafted: int, accepted: int, end_ms: float) -> None:
        """One verify pass, ending `end_ms` after the call started, that checked `drafted` drafts and
        accepted the first `accepted` (so it emitted accepted + 1 tokens)."""
        self.step_end_ms.append(end_ms)
        self.step_tokens.append(accepted + 1)
        self.step_draft.append(drafted)
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        for i in range(drafted):
            self.drafted_per_position[i] += 1
            self.accepted_per_position[i] += i < accepted

    @property
    def tpot_ms(self) -> float:
        return (self.total_ms - self.ttft_ms) / max(1, self.new_tokens - 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / (self.total_ms / 1e3) if self.total_ms else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per trunk verify step (1 + accepted drafts per step)."""
        return 1 + self.accepted / self.steps if self.steps else 1.0

    def step_ms(self) -> list[float]:
        """Duration of each verify step (the first counted from the first token)."""
        ends = [self.ttft_ms, *self.step_end_ms]
        return [b - a for a, b in zip(ends, ends[1:])]

    def record_choice(self, choice: Choice, rows: int) -> None:
        """The controller's expectation for one step, this row's share of it."""
        self.predicted_tokens += choice.expected_tokens / rows
        self.predicted_ms += choice.expected_ms
        self.plain_step_ms += choice.plain_ms
        self.probes += choice.probe

    def gains(self) -> dict:
        """draft="auto": tokens per ms the controller expected and what the steps achieved, each relative
        to the cost model's K = 0 step (one token per step)."""
        if not self.predicted_ms or not self.steps:
            return {}
        plain = self.plain_step_ms / self.steps
        steps_ms = self.step_end_ms[-1] - self.ttft_ms  # all verify steps, end to end
        return {"predicted_gain": float(self.predicted_tokens / self.predicted_ms * plain),
                "measured_gain": float(sum(self.step_tokens) / steps_ms * plain) if steps_ms > 0 else None,
                "probe_steps": self.probes}  # fmt: skip

    def to_dict(self) -> dict:
        host = self.total_ms - self.trunk_ms - self.mtp_ms
        histogram: dict[str, int] = {}
        for k in self.step_draft:
            histogram[str(k)] = histogram.get(str(k), 0) + 1
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "tokens_per_s": self.tokens_per_s,
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "drafted_per_position": list(self.drafted_per_position),
            "accepted_per_position": [a / d if d else 0.0 for a, d in
                                      zip(self.accepted_per_position, self.drafted_per_position)],  # fmt: skip
            "mean_acceptance_length": self.mean_acceptance_length,
            "time_ms": {"trunk": self.trunk_ms, "mtp": self.mtp_ms, "host": host, "total": self.total_ms},
            # per verify step: its duration and the tokens it emitted (per-token latency = ms / tokens)
            "step_ms": self.step_ms(),
            "step_tokens": list(self.step_tokens),
            "step_draft": list(self.step_draft),
            "draft": self.draft,
            "draft_histogram": dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
            "acceptance": self.acceptance,
            **self.gains(),
        }


class Decoder:
    """The graph calls of draft-and-verify decoding over an artifact's engines, the step costs and the
    artifact-wide acceptance that draft="auto" uses; generate() runs the step engine."""

    def __init__(self, engines: Engines, prefill_chunk: int = 256, max_draft: int | None = None):
        self.engines = engines
        m = engines.manifest
        c = m["config"]
        self.layers, self.n_mtp = c["num_hidden_layers"], c["num_nextn_predict_layers"]
        self.r, self.d, self.h = c["kv_lora_rank"], c["qk_rope_head_dim"], c["hidden_size"]
        self.max_positions = c["max_position_embeddings"]
        self.np = np.dtype(ARRAY_DTYPES[m["dtype"]])
        self.prefill_chunk = prefill_chunk
        # the trunk's cache I/O names per layer (io.py), spelled once per decoder: a step builds its feed from them
        self.past_names, self.new_names = [io.past(i) for i in range(self.layers)], [io.new(i) for i in range(self.layers)]
        # draft="auto" looks at K = 0 .. max_draft: every module once, then two recursions with the last one
        self.max_draft = (self.n_mtp + 2 if self.n_mtp else 0) if max_draft is None else max_draft
        self._costs: CostModel | None = None
        self._acceptance: AcceptanceCounts | None = None
        # every MTP graph on nextn's kernel: a step's drafts in one call of it (mtp_module.NativeDrafter)
        self.drafter = native_drafter(engines, self.n_mtp, self.np)

    # -- draft="auto": the controller's costs and artifact-wide acceptance ------------------------
    def depth(self, draft: int | str) -> int:
        """The most drafts one step may take."""
        return self.max_draft if draft == AUTO else int(draft)

    @property
    def has_costs(self) -> bool:
        """Whether a draft="auto" request has opened the step costs (plain decoding alone never does)."""
        return self._costs is not None

    def costs(self) -> CostModel:
        if self._costs is None:
            cache = cost_cache_file(self.engines) if self.engines.setup is not None else None
            self._costs = CostModel(self._timing_run, self.max_draft, cache)
        return self._costs

    def _timing_run(self, b: int, k: int, steps: int) -> list[Stats]:
        """`steps` decode steps at a fixed K for b random prompts (costs.calibrate): a budget of tokens that
        `steps` steps cannot exhaust, and a stop after `steps` steps whatever they accepted."""
        rng = np.random.default_rng(b * 1000 + k)
        vocab = self.engines.manifest["config"]["vocab_size"]
        prompts = [rng.integers(0, vocab, CALIB_PROMPT).tolist() for _ in range(b)]
        n = steps * (k + 1) + 1
        return [st for _, st in self.generate_many(prompts, n, draft=k, stop=_StepLimit(steps))]

    def acceptance_prior(self) -> AcceptanceCounts:
        """Every sequence's observations on this artifact, seeded from a cached earlier run or the
        artifact's quantization report; empty when neither exists (the first steps then explore)."""
        if self._acceptance is None:
            saved = self.costs().acceptance
            if saved and len(saved.get("trials", [])) == self.max_draft:
                self._acceptance = AcceptanceCounts([float(x) for x in saved["trials"]], [float(x) for x in saved["hits"]])
            else:
                rates = report_acceptance(self.engines.manifest)
                self._acceptance = (AcceptanceCounts.from_rates(rates, self.max_draft) if rates
                                    else AcceptanceCounts.empty(self.max_draft))  # fmt: skip
        return self._acceptance

    def prepare_auto(self, *batches: int) -> None:
        """draft="auto" at these batch sizes: the acceptance prior loaded and the step costs calibrated now
        (cached per artifact and machine), before any sequence's clock starts. Nothing without MTP modules."""
        if self.depth(AUTO):
            self.acceptance_prior()
            for b in batches:
                self.costs().at(cost_batch(b))

    def controller(self, rows: int) -> DraftController:
        prior = self.acceptance_prior()
        return DraftController(self.costs(), [SequenceAcceptance(prior) for _ in range(rows)], self.max_draft)

    def close(self) -> None:
        """Save the refined step costs and the artifact-wide acceptance for the next process."""
        if self._costs is not None:
            if self._acceptance is not None:
                a = self._acceptance
                self._costs.acceptance = {"trials": list(a.trials), "hits": list(a.hits)}
                self._costs.changed = True
            self._costs.save()

    # -- one engine call, timed -----------------------------------------------------------------
    def _run(self, name: str, feed: dict, stats: Stats, into: dict | None = None) -> list[np.ndarray]:
        t = time.perf_counter()
        out = self.engines[name].run(feed, into)
        ms = (time.perf_counter() - t) * 1e3
        if name == "trunk":
            stats.trunk_ms += ms
        else:
            stats.mtp_ms += ms
        return out

    def trunk(self, st: _State, tokens: list[int], stats: Stats) -> tuple[np.ndarray, np.ndarray]:
        """Run the trunk on `tokens` at positions n.. and append them to its cache. -> logits, hidden."""
        n, s = st.n, len(tokens)
        feed = {io.INPUT_IDS: np.asarray([tokens], np.int64), io.POSITION_IDS: np.arange(n, n + s, dtype=np.int64)[None],
                io.ATTENTION_MASK: np.ones((1, n + s), np.int64)}  # fmt: skip
        into = {io.HIDDEN: st.hidden[None, n : n + s]}  # the new entries land straight in the preallocated caches
        for (past_c, past_k), (new_c, new_k), c_kv, k_pe in zip(self.past_names, self.new_names, st.kv_c, st.kv_k):
            feed[past_c], feed[past_k] = c_kv[:, :n], k_pe[:, :n]
            into[new_c], into[new_k] = c_kv[:, n : n + s], k_pe[:, n : n + s]
        out = self._run("trunk", feed, stats, into)
        st.n = n + s
        return out[io.LOGITS_AT][0], out[io.HIDDEN_AT][0]  # [S, V], [S, H]

    def trunk_rows(self, states: list[_State], tokens: list[list[int]], stats: list[Stats]) -> list[np.ndarray]:
        """One trunk pass for b sequences, row r running `tokens[r]` at its positions n_r.. and appending
        them to its own cache. The pasts are gathered into [b, P, R] (P = max n_r; a shorter row's missing
        slots and a narrower row's padding tokens are masked, so they change nothing). -> logits per row.
        One row takes trunk(): zero-copy views of its own caches."""
        if len(states) == 1:
            return [self.trunk(states[0], tokens[0], stats[0])[0]]
        b, s = len(states), max(len(t) for t in tokens)
        p = max(st.n for st in states)
        ids, pos = np.zeros((b, s), np.int64), np.zeros((b, s), np.int64)
        mask = np.zeros((b, p + s), np.int64)
        for r, (st, t) in enumerate(zip(states, tokens)):
            ids[r, : len(t)] = t
            pos[r] = st.n + np.arange(s)
            mask[r, : st.n] = 1
            mask[r, p : p + len(t)] = 1
        pasts = []
        for i in range(self.layers):
            c_kv, k_pe = np.empty((b, p, self.r), self.np), np.empty((b, p, self.d), self.np)  # [b, P, R], [b, P, D]
            for r, st in enumerate(states):
                c_kv[r, : st.n], k_pe[r, : st.n] = st.kv_c[i][0, : st.n], st.kv_k[i][0, : st.n]
                c_kv[r, st.n :], k_pe[r, st.n :] = 0, 0  # masked, but never uninitialized (NaN * 0 is NaN)
            pasts.append((c_kv, k_pe))
        t = time.perf_counter()
        out = io.split_trunk(self.engines["trunk"].run(io.trunk_feed(ids, pos, mask, pasts)))
        ms = (time.perf_counter() - t) * 1e3
        for x in stats:
            x.trunk_ms += ms  # one shared pass: every row waited for it
        for r, (st, t) in enumerate(zip(states, tokens)):
            n, w = st.n, len(t)
            for i, (c_kv, k_pe) in enumerate(out.new):
                st.kv_c[i][0, n : n + w], st.kv_k[i][0, n : n + w] = c_kv[r, :w], k_pe[r, :w]
            st.hidden[n : n + w] = out.hidden[r, :w]
            st.n = n + w
        return [out.logits[r, : len(t)] for r, t in enumerate(tokens)]

    def _mtp(self, st: _State, module: int, start: int, tokens: list[int], hidden: np.ndarray,
             stats: Stats) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Run MTP `module` on its cache slots start.. (one token and one hidden per slot). -> logits, hidden_out
        of every slot; of the last slot only for the last module, whose other slots' outputs nothing reads
        (only their cache entries: the next depth's catch-up reads hidden_out, and there is none)."""
        s = len(tokens)
        first = start + s - 1 if module == self.n_mtp - 1 else start  # the first slot whose output is wanted
        feed = io.mtp_feed(np.asarray([tokens], np.int64), hidden[None].astype(self.np, copy=False),
                           (np.arange(start, start + s, dtype=np.int64) + module + 1)[None],
                           np.ones((1, start + s), np.int64), st.mtp_c[module][:, :start], st.mtp_k[module][:, :start],
                           np.arange(first - start, s, dtype=np.int64)[None])  # fmt: skip
        c, k = io.new()
        into = {c: st.mtp_c[module][:, start : start + s], k: st.mtp_k[module][:, start : start + s],
                io.HIDDEN_OUT: st.mtp_hidden[module][None, first : start + s]}  # fmt: skip
        out = self._run(f"mtp_{module}", feed, stats, into)
        return out[io.LOGITS_AT][0], out[io.HIDDEN_AT][0]

    # -- drafting --------------------------------------------------------------------------------
    def draft(self, st: _State, k_total: int, stats: Stats) -> list[int]:
        """k_total draft tokens after t_n, from the MTP modules (and recursion with the last)."""
        t = time.perf_counter()
        if self.drafter is not None:
            drafts = self.drafter.draft(st, k_total, self.prefill_chunk)
            stats.mtp_ms += (time.perf_counter() - t) * 1e3  # all of it is MTP calls
        else:
            drafts = self._draft_tokens(st, k_total, stats)
        stats.draft_ms += (time.perf_counter() - t) * 1e3
        return drafts

    def _draft_tokens(self, st: _State, k_total: int, stats: Stats) -> list[int]:
        n, drafts = st.n, []

        def token(idx: int) -> int:  # t_idx, or the draft standing in for it
            return st.tokens[idx] if idx <= n else drafts[idx - n - 1]

        last = None
        for k in range(min(k_total, self.n_mtp)):
            start = st.mtp_valid[k]
            src = st.hidden if k == 0 else st.mtp_hidden[k - 1]
            for a in range(start, n, self.prefill_chunk):  # chunked like prefill (long prompts)
                b = min(n, a + self.prefill_chunk)
                logits, out = self._mtp(st, k, a, [token(i + k + 1) for i in range(a, b)], src[a:b], stats)
            drafts.append(int(logits[-1].argmax()))
            st.mtp_valid[k] = max(0, n - k)  # slots from n-k on used drafted tokens: provisional
            last = out[-1]
        module = self.n_mtp - 1
        for j in range(self.n_mtp, k_total):  # recursion with the last module, one slot further each time
            slot = n - 1 + (j - module)
            logits, out = self._mtp(st, module, slot, [drafts[j - 1]], last[None], stats)
            drafts.append(int(logits[-1].argmax()))
            last = out[-1]
        return drafts

    # -- generation ------------------------------------------------------------------------------
    def check(self, prompts: list[list[int]], draft: int | str, params: SamplingParams,
              accept: AcceptRule = AcceptRule()) -> None:  # fmt: skip
        """Reject bad requests before any work: one-line errors naming the flag."""
        params.check()
        accept.check(params)
        if any(not p for p in prompts):
            raise NextnError("empty prompt")
        if draft != AUTO:
            if isinstance(draft, bool) or not isinstance(draft, (int, np.integer)):
                raise NextnError(f"--draft {draft!r}: expected auto or an integer >= 0")
            if draft < 0:
                raise NextnError(f"--draft {draft}: must be >= 0")
            if draft > 0 and self.n_mtp == 0:
                raise NextnError(f"--draft {draft}: the artifact has no MTP module to draft with (use --draft 0)")
        longest = max(len(p) for p in prompts)
        if longest >= self.max_positions:
            raise NextnError(f"prompt of {longest} tokens does not fit the context of {self.max_positions}")

    def generate(self, prompt: list[int], max_new_tokens: int, draft: int | str = AUTO,
                 params: SamplingParams = SamplingParams(), eos_ids: tuple[int, ...] = (), stop=None,
                 accept: AcceptRule = AcceptRule()) -> tuple[list[int], Stats]:  # fmt: skip
        """One sequence to the end, through the step engine (engine.py). -> new token ids, stats."""
        return self.generate_many([prompt], max_new_tokens, draft, params, eos_ids, stop, accept)[0]

    def generate_many(self, prompts: list[list[int]], max_new_tokens: int, draft: int | str = AUTO,
                      params: SamplingParams = SamplingParams(), eos_ids: tuple[int, ...] = (), stop=None,
                      accept: AcceptRule = AcceptRule()) -> list[tuple[list[int], Stats]]:  # fmt: skip
        """Several sequences sharing each trunk pass; each row's result is that of decoding it alone."""
        from nextn.runtime.engine import Request, run_to_end

        self.check(prompts, draft, params, accept)
        if draft == AUTO:
            self.prepare_auto(len(prompts))
        seqs = run_to_end(self, [Request(list(p), max_new_tokens, draft, params, tuple(eos_ids), stop, accept)
                                 for p in prompts])  # fmt: skip
        return [(s.final(), s.stats) for s in seqs]

    def new_stats(self, prompt_tokens: int, draft: int | str, accept: AcceptRule) -> Stats:
        depth = self.depth(draft)
        return Stats(prompt_tokens=prompt_tokens, drafted_per_position=[0] * depth, accepted_per_position=[0] * depth,
                     draft=str(draft), acceptance=accept.describe())  # fmt: skip

    def ready(self, st: _State, k: int) -> bool:
        """Whether drafting k tokens now needs no MTP module whose cache lags by more than a step's tokens."""
        modules = range(min(k, self.n_mtp))
        return all(st.n - st.mtp_valid[m] <= self.max_draft + 1 + m for m in modules)

    def steady(self, st: _State, k: int) -> bool:
        """Whether a step at K = k now tells what such steps cost. Not the sequence's first SETTLE_STEPS decode
        steps (the embedded model's first plain steps after a 64-token prefill took 1.2-1.5 ms, then 0.8-0.9: a
        level measured there read plain decoding twice as dear, and auto kept whichever K it drafted first,
        every other K's cost being read over that level). A plain step: if the step before was plain too
        (just after drafting, the CPU caches hold the MTP graphs' weights: 20-40% slower). A drafting step: if
        the MTP modules it used were current (`ready`: a catch-up after plain steps is not what a draft costs);
        one just after a switch of K counts, since it can only raise a ratio and switching costs that much."""
        same = st.last_k == k
        st.last_k = k
        st.decode_steps += 1
        if st.decode_steps <= SETTLE_STEPS:  # just after the prompt's prefill: cold CPU caches
            return False
        return same if k == 0 else self.ready(st, k)

    @staticmethod
    def _truncate(new: list[int], limit: int, eos_ids, stop) -> list[int]:
        new = new[:limit]
        for i, t in enumerate(new):
            if t in eos_ids:
                new = new[: i + 1]
                break
        if stop is not None:
            cut = stop(new)
            if cut is not None:
                new = new[:cut]
        return new

    def _done(self, new, limit, eos_ids, stop, tail: int | None = None) -> bool:
        """`tail`: only the last `tail` tokens are new since the previous check (EOS is looked for there)."""
        fresh = new if tail is None else new[-tail:]
        return len(new) >= limit or any(t in eos_ids for t in fresh) or (stop is not None and stop(new) is not None)


class _StepLimit:
    """A stop condition that ends each sequence after `steps` verify steps. The decoder asks it once before
    the first step and once after each (with the same growing list per sequence); a final truncation asks
    with a copy, which it leaves uncut."""

    def __init__(self, steps: int):
        self.steps, self.asked = steps, {}

    def __call__(self, new: list[int]) -> int | None:
        n = self.asked[id(new)] = self.asked.get(id(new), 0) + 1
        return len(new) if n > self.steps else None


class _State:
    """Preallocated caches of one sequence."""

    def __init__(self, dec: Decoder, max_len: int):
        self.max_len = max_len
        z = np.zeros
        self.kv_c = [z((1, max_len, dec.r), dec.np) for _ in range(dec.layers)]
        self.kv_k = [z((1, max_len, dec.d), dec.np) for _ in range(dec.layers)]
        self.hidden = z((max_len, dec.h), dec.np)
        self.mtp_c = [z((1, max_len, dec.r), dec.np) for _ in range(dec.n_mtp)]
        self.mtp_k = [z((1, max_len, dec.d), dec.np) for _ in range(dec.n_mtp)]
        self.mtp_hidden = [z((max_len, dec.h), dec.np) for _ in range(dec.n_mtp)]
        self.native = None  # a NativeDrafter's view of these arrays (their addresses), made on first use
        self.reset()

    def reset(self) -> None:
        """Empty, for another sequence (stale slots are never read: lengths say what is valid)."""
        self.mtp_valid = [0] * len(self.mtp_c)
        self.last_k = -1  # K of the previous step
        self.decode_steps = 0  # decode steps since the prompt's prefill (Decoder.steady)
        self.n = 0
        self.tokens: list[int] = []


def report_acceptance(manifest: dict) -> list[float] | None:
    """Acceptance per draft position of a quantized artifact's own report (its largest K), if any, as the
    controller counts it: draft j accepted given drafts < j were. The report's figures (Stats'
    accepted_per_position) are shares of all drafts at j, so each is divided by the one before (taken as
    they were, 0.2 underrated every position past the first: K = 1 where K = 3 measured faster)."""
    runs = (((manifest.get("quantization") or {}).get("report") or {}).get("decoding") or {}).get("quantized") or {}
    best = max(runs, key=lambda k: int(k.split("=")[1]) if k.startswith("K=") else -1, default=None)
    shares = runs.get(best, {}).get("accepted_per_position") if best else None
    if not shares:
        return None
    reach = [1.0, *[float(x) for x in shares]]
    return [min(1.0, reach[j + 1] / reach[j]) if reach[j] > 0 else 0.0 for j in range(len(shares))]
