"""Batched draft-and-verify: one trunk pass verifies every sequence's drafts at once.

Sequences of different lengths share one trunk cache of slots. Prompts are left-padded to the longest;
each step appends S = 1 + (largest K) slots for every row, and a row keeps valid only the slots of its
accepted tokens: rejected drafts (and a shorter row's padding) become masked slots instead of being
moved, so nothing is copied on rejection. Positions are explicit per row, so masked slots change nothing
numerically. MTP drafting stays per sequence (its own compact caches, as in decoder.py): MTP calls are
small next to the trunk pass, and a sequence then drafts exactly as it would alone.

    slots:   0 .. L0-1 (left-padded prompts) | step 1: T .. T+S-1 | step 2 ...
    row r:   valid[r, slot] = 1 for its prompt tokens and accepted tokens only

Each row's result is that of decoding it alone (greedy: token for token; sampling: the same draws from
a per-row generator seeded alike).
"""

from __future__ import annotations

import time

import numpy as np

from nextn.runtime.decoder import AUTO, Decoder, Stats, _State
from nextn.runtime.sampling import AcceptRule, SamplingParams, accept_drafts, sample, target_probs


def generate_batch(
    dec: Decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    draft: int | str = AUTO,
    params: SamplingParams = SamplingParams(),
    eos_ids: tuple[int, ...] = (),
    stop=None,
    accept: AcceptRule = AcceptRule(),
) -> list[tuple[list[int], Stats]]:
    dec.check(prompts, draft, params, accept)
    b, l0 = len(prompts), max(len(p) for p in prompts)
    depth = dec.depth(draft)
    ctrl = dec.controller(b) if draft == AUTO and depth else None  # one K per shared pass, per-row acceptance
    budgets = [min(max_new_tokens, dec.max_positions - len(p)) for p in prompts]
    cap = l0 + max(budgets) * (depth + 1) + 2  # worst case: one token per step, K+1 slots each
    kv_c = [np.zeros((b, cap, dec.r), dec.np) for _ in range(dec.layers)]
    kv_k = [np.zeros((b, cap, dec.d), dec.np) for _ in range(dec.layers)]
    valid = np.zeros((b, cap), np.int64)
    rows = [_State(dec, len(p) + budgets[i] + depth + 2, trunk=False) for i, p in enumerate(prompts)]
    stats = [dec.new_stats(len(p), draft, accept) for p in prompts]
    rngs = [np.random.default_rng(params.seed) for _ in prompts]
    t0 = time.perf_counter()

    def trunk(ids: np.ndarray, pos: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Batched trunk pass on slots t .. t+S (valid[:, :t+S] already set); returns logits, hidden."""
        s = ids.shape[1]
        feed = {"input_ids": ids, "position_ids": pos, "attention_mask": valid[:, : t + s]}
        for i in range(dec.layers):
            feed[f"past.{i}.c_kv"] = np.ascontiguousarray(kv_c[i][:, :t])  # a copy: rows interleave in memory
            feed[f"past.{i}.k_pe"] = np.ascontiguousarray(kv_k[i][:, :t])
        t1 = time.perf_counter()
        out = dec.engines["trunk"].run(feed)
        ms = (time.perf_counter() - t1) * 1e3
        for st in stats:
            st.trunk_ms += ms  # one shared pass: every row waited for it
        for i in range(dec.layers):
            kv_c[i][:, t : t + s], kv_k[i][:, t : t + s] = out[2 + 2 * i], out[3 + 2 * i]
        return out[0], out[1]

    # Prefill, left-padded, in chunks.
    ids = np.zeros((b, l0), np.int64)
    for r, p in enumerate(prompts):
        ids[r, l0 - len(p) :] = p
        valid[r, l0 - len(p) : l0] = 1
    pos = np.clip(valid[:, :l0].cumsum(-1) - 1, 0, None)
    for a in range(0, l0, dec.prefill_chunk):
        e = min(l0, a + dec.prefill_chunk)
        logits, hidden = trunk(ids[:, a:e], pos[:, a:e], a)
        for r, p in enumerate(prompts):
            lo = max(a, l0 - len(p))
            rows[r].hidden[lo - (l0 - len(p)) : e - (l0 - len(p))] = hidden[r, lo - a : e - a]
    t = l0
    prefill_trunk_ms = stats[0].trunk_ms
    new: list[list[int]] = []
    for r, p in enumerate(prompts):
        rows[r].tokens, rows[r].n = list(p), len(p)
        last = logits[r, -1:]
        tok = int(last[0].argmax()) if params.greedy else sample(target_probs(last, params)[0], rngs[r])
        rows[r].tokens.append(tok)
        new.append([tok])
        stats[r].ttft_ms = (time.perf_counter() - t0) * 1e3

    done = [dec._done(new[r], budgets[r], eos_ids, stop) for r in range(b)]
    while not all(done):
        active = [r for r in range(b) if not done[r]]
        left = max(budgets[r] - len(new[r]) for r in active)
        choice = dec.choose(ctrl, [stats[r] for r in active], left, [rows[r] for r in active], active) if ctrl else None
        step_k = choice.k if choice else depth
        steady = all([dec.steady(rows[r], step_k) for r in active]) and not (choice and choice.probe)  # every row notes K
        drafts = [[] for _ in range(b)]
        for r in active:
            k = min(step_k, budgets[r] - len(new[r]))
            if k:
                drafts[r] = dec._draft(rows[r], k, stats[r])
        s = 1 + max(len(d) for d in drafts)
        ids = np.zeros((b, s), np.int64)
        pos = np.zeros((b, s), np.int64)
        for r in range(b):
            ids[r, : 1 + len(drafts[r])] = [rows[r].tokens[rows[r].n], *drafts[r]]
            pos[r] = rows[r].n + np.arange(s)
            valid[r, t : t + 1 + len(drafts[r])] = 0 if done[r] else 1  # causal among the row's own new slots
        logits, hidden = trunk(ids, pos, t)
        for r in range(b):
            if done[r]:
                continue
            k = len(drafts[r])
            a, tok = accept_drafts(logits[r, : k + 1], drafts[r], params, rngs[r], accept)
            valid[r, t + a + 1 : t + s] = 0  # rejected drafts stay behind as masked slots
            n = rows[r].n
            rows[r].hidden[n : n + a + 1] = hidden[r, : a + 1]
            rows[r].n = n + a + 1
            step_tokens = [*drafts[r][:a], tok]
            rows[r].tokens += step_tokens
            new[r] += step_tokens
            stats[r].record_step(k, a, (time.perf_counter() - t0) * 1e3)
            if ctrl:
                ctrl.rows[r].observe(k, a)
            done[r] = dec._done(new[r], budgets[r], eos_ids, stop, len(step_tokens))
        if ctrl:
            dec.observe_step(b, step_k, stats[active[0]], steady)
        t += s

    total = (time.perf_counter() - t0) * 1e3
    results = []
    for r in range(b):
        ids_r = dec._truncate(new[r], budgets[r], eos_ids, stop)
        stats[r].new_tokens, stats[r].total_ms = len(ids_r), total
        stats[r].decode_trunk_ms = stats[r].trunk_ms - prefill_trunk_ms
        results.append((ids_r, stats[r]))
    return results
