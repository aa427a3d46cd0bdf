"""`draft="auto"`: before each step, the draft depth K that maximizes expected tokens per millisecond.

A step at depth K emits E(K) tokens on average and costs c(b, K) milliseconds:

    E(K)    = 1 + sum_{j=1..K} prod_{i<=j} alpha_i        alpha_i: chance the target accepts draft i,
                                                           given drafts 1..i-1 were accepted
    c(b, K) = trunk(b, K+1) + b * K * mtp + host(b)        (costs.py: measured on this machine, refined online)

and K* = argmax_{0 <= K <= max_draft} sum_rows E_r(K) / c(b, K). K = 0 is plain decoding, so drafting
switches off by itself where it does not pay (a random-weight model, a batch where verifying is
expensive) and back on where it does.

Acceptance per position is estimated per sequence: its own recent observations (counts that fade by
DECAY per step, because acceptance moves with the text) on top of an artifact-wide rate (every
sequence's observations, or the artifact's quantization report, or a cached earlier run) worth
PRIOR_WEIGHT observations. A position nobody has tried yet starts at UNTRIED_RATE.

Exploration: a choice only learns about what it runs. Probe steps alternate between one position
deeper than the choice (K* + 1; all of max_draft when the artifact has never been drafted on) and, when
K* > 0, a plain step (K = 0: it keeps the K = 0 cost measured in context, and costs nothing against
plain decoding), first after PROBE_FIRST steps, then at doubling intervals up to PROBE_MAX, restarting
when the choice changes.

K depends only on steps already taken, never on the step being decided, so greedy output is identical
to K = 0 and sampling keeps the target distribution (every K is lossless on its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nextn.runtime.costs import CostModel

DECAY = 0.95  # per step: a sequence's own observations fade with a horizon of ~20 steps
PRIOR_WEIGHT = 4.0  # the artifact-wide rate counts as this many of a sequence's own observations
UNTRIED_RATE = 0.5  # acceptance assumed at a position never drafted on this artifact
PROBE_FIRST, PROBE_MAX = 8, 256  # steps between probes: first, and the cap of the doubling
CONFIDENT_TRIALS = 32  # artifact-wide trials at position 1 past which probing starts at 4 x PROBE_FIRST


@dataclass
class AcceptanceCounts:
    """Per draft position: how often a draft was checked (all earlier ones accepted) and accepted."""

    trials: np.ndarray
    hits: np.ndarray

    @classmethod
    def empty(cls, positions: int) -> AcceptanceCounts:
        return cls(np.zeros(positions), np.zeros(positions))

    @classmethod
    def from_rates(cls, rates: list[float], positions: int, weight: float = 16.0) -> AcceptanceCounts:
        """A prior from known rates (a quantization report, a cached run), worth `weight` trials each."""
        c = cls.empty(positions)
        n = min(len(rates), positions)
        c.trials[:n] = weight
        c.hits[:n] = np.clip(np.asarray(rates[:n], float), 0, 1) * weight
        return c

    def add(self, drafted: int, accepted: int, scale: float = 1.0) -> None:
        """One verify step: drafts 1..accepted were accepted, draft accepted+1 (if any) was rejected."""
        checked = min(drafted, accepted + 1)
        self.trials[:checked] += scale
        self.hits[:accepted] += scale

    def rates(self) -> np.ndarray:
        """Artifact-wide rate per position; UNTRIED_RATE where there is no trial yet."""
        out = np.full(len(self.trials), UNTRIED_RATE)
        tried = self.trials > 0
        out[tried] = (self.hits[tried] + UNTRIED_RATE) / (self.trials[tried] + 1)  # one pseudo-trial at the default
        return out


def expected_tokens(rates: np.ndarray) -> np.ndarray:
    """[K+1]: tokens one verify step emits at K = 0..len(rates) drafts (E(0) = 1)."""
    return np.concatenate([[1.0], 1 + np.cumsum(np.cumprod(rates))])


@dataclass
class SequenceAcceptance:
    """One sequence's acceptance estimate: its fading counts on top of the artifact-wide rates."""

    prior: AcceptanceCounts
    own: AcceptanceCounts = field(init=False)

    def __post_init__(self):
        self.own = AcceptanceCounts.empty(len(self.prior.trials))

    def observe(self, drafted: int, accepted: int) -> None:
        self.own.trials *= DECAY
        self.own.hits *= DECAY
        self.own.add(drafted, accepted)
        self.prior.add(drafted, accepted)

    def rates(self) -> np.ndarray:
        p = self.prior.rates()
        return (self.own.hits + PRIOR_WEIGHT * p) / (self.own.trials + PRIOR_WEIGHT)


@dataclass
class Choice:
    """What the controller decided for one step and what it expected."""

    k: int
    expected_tokens: float  # summed over rows
    expected_ms: float
    plain_ms: float  # the same step at K = 0 (one token per row)
    probe: bool


class DraftController:
    """Picks one K per step for a set of rows (one sequence, or a batch sharing each trunk pass)."""

    def __init__(self, costs: CostModel, rows: list[SequenceAcceptance], max_draft: int):
        self.costs, self.rows, self.max_draft = costs, rows, max_draft
        prior = rows[0].prior
        self.step = 0
        self.best = -1
        self.probes = 0
        confident = prior.trials[0] >= CONFIDENT_TRIALS
        self.interval = PROBE_FIRST * (4 if confident else 1)
        # Never drafted on this artifact: the first step tries every position.
        self.next_probe = 0 if prior.trials[0] == 0 else self.interval

    def choose(self, active: list[int] | None = None, limit: int | None = None) -> Choice:
        """K for the next step of rows `active` (default: all), at most `limit` (the tokens still wanted)."""
        active = list(range(len(self.rows))) if active is None else active
        top = min(self.max_draft, self.max_draft if limit is None else limit)
        # every row shares the trunk pass (finished rows ride along masked); the active ones draft
        tokens = sum(expected_tokens(self.rows[r].rates()[:top]) for r in active)  # [top+1]
        ms = np.array([self.costs.step_ms(len(self.rows), k, len(active)) for k in range(top + 1)])
        best = int(np.argmax(tokens / ms))
        if best != self.best and self.best >= 0:  # the situation changed: look around again soon
            self.interval = PROBE_FIRST
            self.next_probe = min(self.next_probe, self.step + PROBE_FIRST)
        self.best = best
        k, probe = best, False
        if self.step >= self.next_probe and (top > best or best > 0):
            never = self.rows[active[0]].prior.trials[0] == 0
            deeper = top > best and (self.probes % 2 == 0 or best == 0)
            k, probe = (top if never else best + 1) if deeper else 0, True
            self.probes += 1
            self.next_probe = self.step + self.interval
            self.interval = min(2 * self.interval, PROBE_MAX)
        self.step += 1
        return Choice(k, float(tokens[k]), float(ms[k]), float(ms[0]), probe)
