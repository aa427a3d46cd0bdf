"""Choosing tokens: greedy and sampled, and accepting drafted tokens so that output is unchanged.

Greedy: a draft is accepted iff it is the target's argmax; the first mismatch is replaced by the
argmax, so the output is token for token that of plain greedy decoding.

Sampling: MTP drafts are argmax tokens, i.e. a point-mass draft distribution q = 1[d]. Rejection
sampling (Leviathan et al.; vLLM's rejection sampler with draft_prob = 1) accepts d with probability
min(1, p(d) / q(d)) = p(d); on rejection it samples from the residual (p - q)+ normalized, which is p
with d removed. Each emitted token then has exactly the target distribution p, the distribution plain
sampling draws from (after temperature, top-k and top-p).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nextn.errors import NextnError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise NextnError(f"--temperature {self.temperature}: must be a finite number >= 0")
        if self.top_k < 0:
            raise NextnError(f"--top-k {self.top_k}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise NextnError(f"--top-p {self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class AcceptRule:
    """How drafts are checked. Exact (the default): greedy accepts the target's argmax only, sampling
    uses rejection sampling; output is that of plain decoding. Relaxed (opt-in, lossy, greedy only;
    TensorRT-LLM's rule for MTP): a draft is also accepted when it is among the target's `top_n` tokens
    and its log-probability is within `delta` of the top one. The output then can differ from plain
    greedy decoding; stats and the CLI say so."""

    relaxed: bool = False
    top_n: int = 1
    delta: float = 0.0

    MODES = ("exact", "relaxed")
    RELAXED_TOP, RELAXED_DELTA = 3, 0.5  # defaults of --accept relaxed
    KNOBS_NEED_RELAXED = "--relaxed-top/--relaxed-delta: relaxed acceptance is lossy; ask for it with --accept relaxed"

    @classmethod
    def from_options(cls, accept: str = "exact", top_n: int | None = None, delta: float | None = None) -> AcceptRule:
        """--accept, --relaxed-top, --relaxed-delta; the relaxed knobs alone are refused (lossy)."""
        if accept not in cls.MODES:
            raise NextnError(f"--accept {accept!r}: choose one of {', '.join(cls.MODES)}")
        if accept == "exact":
            if top_n is not None or delta is not None:
                raise NextnError(cls.KNOBS_NEED_RELAXED)
            return cls()
        return cls(True, cls.RELAXED_TOP if top_n is None else top_n, cls.RELAXED_DELTA if delta is None else delta)

    def check(self, params: SamplingParams) -> None:
        if not self.relaxed:
            if self.top_n != 1 or self.delta != 0.0:
                raise NextnError(self.KNOBS_NEED_RELAXED)
            return
        if not params.greedy:
            raise NextnError("--accept relaxed: only with greedy decoding (--temperature 0); sampling keeps "
                             "the target distribution with exact rejection sampling")  # fmt: skip
        if self.top_n < 1:
            raise NextnError(f"--relaxed-top {self.top_n}: must be >= 1")
        if not (self.delta >= 0 and np.isfinite(self.delta)):
            raise NextnError(f"--relaxed-delta {self.delta}: must be a finite number >= 0")

    def describe(self) -> str:
        if not self.relaxed:
            return "exact"
        return f"relaxed (lossy: a draft in the target's top {self.top_n} within {self.delta:g} of its top log-prob)"


def target_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """[N, V] logits -> [N, V] float64 probabilities after temperature, top-k and top-p."""
    z = logits.astype(np.float64) / params.temperature
    if params.top_k:
        kth = np.sort(z, axis=-1)[:, -min(params.top_k, z.shape[-1])][:, None]  # [N, 1]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    if params.top_p < 1:
        order = np.argsort(-p, axis=-1)  # [N, V]
        sorted_p = np.take_along_axis(p, order, -1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < params.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return p


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from a [V] distribution (inverse CDF: one uniform draw, reproducible from the seed)."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


def accept_drafts(logits: np.ndarray, drafts: list[int], params: SamplingParams, rng: np.random.Generator,
                  rule: AcceptRule = AcceptRule()) -> tuple[int, int]:  # fmt: skip
    """Verify K drafts against the target's K+1 logit rows [K+1, V].

    Returns (a, token): the first a drafts are accepted and `token` follows them (the correction at the
    first rejection, or the bonus token after all K).
    """
    if params.greedy:
        target = logits.argmax(-1)  # [K+1]
        a = 0
        while a < len(drafts) and (drafts[a] == target[a] or (rule.relaxed and _relaxed_ok(logits[a], drafts[a], rule))):
            a += 1
        return a, int(target[a])
    p = target_probs(logits, params)  # [K+1, V]
    for i, d in enumerate(drafts):
        if rng.random() < p[i, d]:
            continue
        residual = p[i].copy()
        residual[d] = 0.0
        return i, sample(residual, rng)
    return len(drafts), sample(p[len(drafts)], rng)


def _relaxed_ok(row: np.ndarray, draft: int, rule: AcceptRule) -> bool:
    """The draft is in the row's top_n and its log-probability is within delta of the best one's
    (log-softmax differences equal logit differences, so no normalization is needed)."""
    gap = float(row.max()) - float(row[draft])
    return gap <= rule.delta and int((row > row[draft]).sum()) < rule.top_n
