"""`draft="auto"`: before each step, the draft depth K that maximizes expected tokens per millisecond.

A step at depth K emits E(K) tokens on average and costs c(b, K) milliseconds:

    E(K)    = 1 + sum_{j=1..K} prod_{i<=j} alpha_i        alpha_i: chance the target accepts draft i,
                                                           given drafts 1..i-1 were accepted
    c(b, K) = ms of a step drafting K per row              (costs.py: measured on this machine, refined online)

and K* = argmax_{0 <= K <= max_draft} sum_rows E_r(K) / c(b, K), a K > 0 only when it promises MARGIN
times K = 0's rate (step costs on this VM are known to 5-10%: a near-tie is not worth the risk).
K = 0 is plain decoding, so drafting switches off by itself where it does not pay (a random-weight model,
a batch where verifying is expensive) and back on where it does.

Acceptance per position is estimated per sequence: its own recent observations (counts that fade by
DECAY per step, because acceptance moves with the text) on top of an artifact-wide rate (every
sequence's observations, or the artifact's quantization report, or a cached earlier run) worth
PRIOR_WEIGHT observations. A position nobody has tried yet starts at UNTRIED_RATE.

Exploration: a choice only learns about what it runs. Probe steps draft deeper than the choice: the deeper K
that looks best with acceptance and cost doubted as below (K* + 1 learned nothing about the positions past it:
from plain decoding, K = 1 probes kept auto plain where K = 3 ran 1.24x faster; all of max_draft when the
artifact has never been drafted on), first after PROBE_FIRST steps, then
at doubling intervals up to PROBE_MAX, restarting when the choice changes, and only where they could change
it: with acceptance PROBE_OPTIMISM / sqrt(rows) above the estimate, the deeper K would have to beat K* (on a model
whose verify passes cost about a plain step per token, even 15% cheaper, no depth pays, and plain decoding
runs without probes; a pass's tokens are summed over its rows, whose mean acceptance strays from
the artifact's by ~1/sqrt(rows) as much as one row's: at batch 4 the probes from plain decoding, each
catching a module up over every row's tokens since it last ran, cost 5-7% of the steps with the full
optimism and found nothing). A probe whose MTP module has fallen behind first catches its cache up over
every token since it last ran (measured 5-10% of a 128-token generation for two probes). A shared pass waits
until the module is ready. A single row pays the catch-up: from K* = 0, and for a module K* never runs, it is
the only way to learn more (a row drafting at K = 1 waited for good, since the second module only runs at
K >= 2), and the doubling intervals keep it to a few percent. A probe is a burst of PROBE_BURST steps at the deeper K: its first step catches
the module up and teaches acceptance only (a lone step at another K finds other weights in the CPU caches
than a run of them does, measured 20-40% off), the rest are steps like any other at that K and teach what
they cost too. Each drafting step moves its ratio toward what it cost over the plain level (costs.py, a
median tracker): a calibration that read drafting too cheap (this VM can move 20-30% within it) is corrected
within a few dozen steps, after which plain decoding wins; one that read it too dear is corrected by the
bursts (with single-step probes it never was: on a 2-core AMD VM a calibration read a 2-token step at 1.72
plain steps where bench measured 1.45, and auto stayed plain, 0.94x, where every fixed K ran 1.12-1.38x
faster). While drafting, a deeper K's step cost is doubted by COST_OPTIMISM as well as its acceptance, or a
calibration that read it too dear would never be tested either; so is the first K's from plain decoding for
a single row (a fresh clone read a 2-token step at 2.06 plain steps, and no acceptance made K = 1 worth a
probe). The level moves with plain steps that follow plain steps only; while drafting, a plain burst every
LEVEL_EVERY drafting steps re-measures it (its first step not counted; the other three's median replaces it;
the steps are counted by the cost model across generate() calls, each of which has its own controller), or
after the machine sped up a stale
level would keep auto drafting where plain decoding had come to win. 0.2 also ran 3 plain "anchor" steps in
every 32 while drafting, meant to keep the level measured; flagged as probes they never did, and counting
them was tried: a plain step amid drafting runs cold (other graphs' weights in the CPU caches, here a second
session's packed copy of the trunk) and they read the level ~35% high, which made drafting look cheap. They
are gone (~3% of every drafting run). While plain decoding wins, the choice is recomputed every RECHECK
steps only, and while drafting every RECHECK_DRAFTING (in decoding, recomputing it took ~15 us of a ~1.2 ms
step: its Python runs cold after each trunk pass).

K depends only on steps already taken, never on the step being decided, so greedy output is identical
to K = 0 and sampling keeps the target distribution (every K is lossless on its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nextn.runtime.costs import CostModel

DECAY = 0.95  # per step: a sequence's own observations fade with a horizon of ~20 steps
RECHECK = 8  # while plain decoding wins, the choice is recomputed every this many steps (nothing it
# depends on moves during plain steps but the machine's level, which does not change which K wins)
RECHECK_DRAFTING = 3  # ... and while drafting, every this many (a hard stretch of text is seen 2 steps late)
PRIOR_WEIGHT = 12.0  # the artifact-wide rate counts as this many of a sequence's own observations
UNTRIED_RATE = 0.5  # acceptance assumed at a position never drafted on this artifact
PROBE_FIRST, PROBE_MAX = 8, 256  # steps between probes: first, and the cap of the doubling
PROBE_BURST = 4  # steps a probe drafts at its depth: one that catches up, then PROBE_BURST - 1 whose cost counts
PROBE_OPTIMISM = 0.15  # a probe is worth it if acceptance this much above the estimate would make it the choice
COST_OPTIMISM = 0.15  # ... and its step this much cheaper (calibrations read 15-25% off; not a shared pass from plain)
MARGIN = 1.05  # drafting must promise this many times K = 0's tokens per ms (costs are known to ~5-10% here)
LEVEL_EVERY = 128  # while drafting, a plain burst (PROBE_BURST steps) every this many steps re-measures the level
CONFIDENT_TRIALS = 32  # artifact-wide trials at position 1 past which probing starts at 4 x PROBE_FIRST


@dataclass
class AcceptanceCounts:
    """Per draft position: how often a draft was checked (all earlier ones accepted) and accepted.
    Plain lists: the controller runs every step, and numpy's per-call cost on a handful of numbers was
    most of its time."""

    trials: list[float]
    hits: list[float]

    @classmethod
    def empty(cls, positions: int) -> AcceptanceCounts:
        return cls([0.0] * positions, [0.0] * positions)

    @classmethod
    def from_rates(cls, rates: list[float], positions: int, weight: float = 16.0) -> AcceptanceCounts:
        """A prior from known rates (a quantization report, a cached run), worth `weight` trials each."""
        c = cls.empty(positions)
        for i, r in enumerate(rates[:positions]):
            c.trials[i], c.hits[i] = weight, min(max(float(r), 0.0), 1.0) * weight
        return c

    def add(self, drafted: int, accepted: int) -> None:
        """One verify step: drafts 1..accepted were accepted, draft accepted+1 (if any) was rejected."""
        for i in range(min(drafted, accepted + 1)):
            self.trials[i] += 1
            self.hits[i] += i < accepted

    def rates(self) -> list[float]:
        """Artifact-wide rate per position; UNTRIED_RATE where there is no trial yet (one pseudo-trial at
        that rate otherwise)."""
        return [(h + UNTRIED_RATE) / (t + 1) if t > 0 else UNTRIED_RATE for t, h in zip(self.trials, self.hits)]


def expected_tokens(rates: list[float]) -> list[float]:
    """[K+1]: tokens one verify step emits at K = 0..len(rates) drafts (E(0) = 1)."""
    out, reach = [1.0], 1.0
    for r in rates:
        reach *= r  # all drafts up to this one accepted
        out.append(out[-1] + reach)
    return out


@dataclass
class SequenceAcceptance:
    """One sequence's acceptance estimate: its fading counts on top of the artifact-wide rates."""

    prior: AcceptanceCounts
    own: AcceptanceCounts = field(init=False)

    def __post_init__(self):
        self.own = AcceptanceCounts.empty(len(self.prior.trials))

    def observe(self, drafted: int, accepted: int) -> None:
        """One step of this sequence. Its own counts fade at every step, plain ones too: a run of rejections
        that made plain decoding win is a stretch of the text, and as plain steps pass the estimate returns
        toward the artifact's rate, so drafting resumes without waiting for a probe (fading per drafting
        step only, 0.2 kept such a sequence plain until probes at doubling intervals found it accepting:
        auto 1.25x beside fixed K = 3's 1.40x on the embedded model)."""
        own = self.own
        own.trials = [t * DECAY for t in own.trials]
        own.hits = [h * DECAY for h in own.hits]
        if drafted:  # a plain step says nothing about acceptance itself
            own.add(drafted, accepted)
            self.prior.add(drafted, accepted)

    def rates(self) -> list[float]:
        return [(h + PRIOR_WEIGHT * p) / (t + PRIOR_WEIGHT)
                for h, t, p in zip(self.own.hits, self.own.trials, self.prior.rates())]  # fmt: skip


@dataclass
class Choice:
    """What the controller decided for one step and what it expected."""

    k: int
    expected_tokens: float  # summed over rows
    expected_ms: float
    plain_ms: float  # the same step at K = 0 (one token per row)
    probe: bool


class DraftController:
    """Picks one K per step for a set of rows (one sequence, or a batch sharing each trunk pass). The step
    engine (engine.py) sets `rows` before each choice: sequences join and leave between steps."""

    def __init__(self, costs: CostModel, rows: list[SequenceAcceptance], max_draft: int):
        self.costs, self.rows, self.max_draft = costs, rows, max_draft
        prior = rows[0].prior
        self.step = 0
        self.best = -1
        self.kept_until = 0  # steps before this one reuse the last choice without recomputing it
        self.kept: tuple[int, Choice] = (0, Choice(0, float(len(rows)), 0.0, 0.0, False))  # (its batch, it)
        self.burst_k, self.burst_left = 0, 0  # a burst's depth (a probe's; 0: the level's) and steps to run
        self.level_due = False  # a plain burst to measure a saved level waits for the next drafting choice
        # batch size -> (the step the last plain burst to measure its saved level started, bursts started)
        self.measuring: dict[int, tuple[int, int]] = {}
        confident = prior.trials[0] >= CONFIDENT_TRIALS
        self.interval = PROBE_FIRST * (4 if confident else 1)
        # Never drafted on this artifact: the first step tries every position.
        self.next_probe = 0 if prior.trials[0] == 0 else self.interval

    def choose(self, active: list[int] | None = None, limit: int | None = None, ready=None,
               batch: int | None = None) -> Choice:  # fmt: skip
        """K for the next step of rows `active` (default: all), at most `limit` (the tokens still wanted).
        `ready(k)`: whether drafting k tokens needs no MTP module that has fallen behind (default: yes).
        `batch`: the batch size whose step costs apply (default: every row shares the trunk pass)."""
        kept_batch, kept = self.kept
        if (self.step < self.kept_until and self.step < self.next_probe and not self.burst_left
                and kept_batch == (batch or len(self.rows)) and (limit is None or limit >= kept.k)):  # fmt: skip
            self.step += 1
            return kept
        active = list(range(len(self.rows))) if active is None else active
        top = min(self.max_draft, self.max_draft if limit is None else limit)
        tokens = [0.0] * (top + 1)  # expected, summed over the active rows
        for r in active:
            tokens = [a + b for a, b in zip(tokens, expected_tokens(self.rows[r].rates()[:top]))]
        key = batch or len(self.rows)  # the batch size whose step costs apply
        costs = self.costs.at(key)
        ms = costs.step
        # A saved level: a plain burst measures it (costs.py); once more if that burst ended without measuring it
        # (its steps ran cold just after a prefill: decoder.steady). Not more: where steps never count (a shared
        # pass with fixed-K rows) bursts would keep auto plain.
        started, bursts = self.measuring.get(key, (0, 0))
        again = self.step >= started + PROBE_BURST and not self.burst_left
        if not costs.measured and bursts < 2 and (not bursts or again):
            self.level_due = True
            self.measuring[key] = (self.step, bursts + 1)
        rate = [tokens[k] / ms[k] / (MARGIN if k else 1.0) for k in range(top + 1)]  # near-ties go to K = 0
        best = max(range(top + 1), key=rate.__getitem__)
        if best != self.best and self.best >= 0:  # the situation changed: look around again soon
            self.interval = PROBE_FIRST
            self.next_probe = min(self.next_probe, self.step + PROBE_FIRST)
        self.best = best
        k, probe = best, False
        if best and (self.level_due or costs.since_level >= LEVEL_EVERY) and not self.burst_left:
            # The level (a plain step's ms) moves only with plain steps, and a drafting K's ratio follows
            # what its steps cost over that level: after the machine speeds up (this VM moved 2x within
            # minutes) a stale level makes plain decoding look dearer than it is and auto keeps drafting
            # where it loses. A plain burst; its first step runs cold and is not counted (decoder.steady).
            # The count is the machine's (costs.py), not this controller's: one per generate() call never
            # reached LEVEL_EVERY in generations of ~40 steps, and the level stayed stale for the process.
            self.burst_k, self.burst_left = 0, PROBE_BURST
            costs.since_level, self.level_due = 0, False  # if the burst's steps do not count, the next is as far
        if self.burst_left:  # a burst's next step, like any other at its depth
            self.burst_left -= 1
            # a probe's burst ends where the choice reaches its depth, a plain one where plain decoding wins
            if (top >= self.burst_k > best) if self.burst_k else best:
                self.level_due = self.level_due and bool(best and self.burst_k)
                self.step += 1
                return Choice(self.burst_k, tokens[self.burst_k], ms[self.burst_k], ms[0], False)
            self.burst_left = 0
        self.level_due = self.level_due and bool(best)  # plain steps measure the level themselves
        if self.step >= self.next_probe and top > best:
            never = self.rows[active[0]].prior.trials[0] == 0
            # A probe drafts the deeper K that looks best were acceptance and cost as doubted below: one
            # position deeper learns nothing about the positions past it (from plain decoding, K = 1 probes
            # kept auto plain where K = 3 ran 1.24x faster: positions 3 and 4 were never tried).
            single = bool(best) or len(active) == 1
            deeper = top if never else max(range(best + 1, top + 1),
                                           key=lambda d: self._optimistic_rate(active, d, ms[d], single))  # fmt: skip
            # A module that has fallen behind (after plain steps, or the deeper module while drafting
            # shallower) is first caught up over every token since it last ran, for every row: one row pays
            # it, a shared pass does not (16 probes from plain at batch 4 cost 7% of a run and found
            # nothing); there the artifact-wide rate, which single rows keep learning, decides. Waiting for
            # the deeper module to be ready kept one row at K = 1 for good: at K = 1 it never runs.
            fits = ready is None or ready(deeper) or len(active) == 1
            # The deeper step's cost is doubted too: a calibration that read it too dear would otherwise never
            # be tested (auto kept K = 1 at 1.13x where K = 3 ran 1.36x; a fresh clone's calibration read a
            # 2-token step at 2.06 plain steps and stayed plain). Not from plain decoding for a shared pass:
            # there every row's module catches up first (at batch 4, 5-7% of a run for probes that found nothing).
            promising = self._optimistic_rate(active, deeper, ms[deeper], single) > rate[best] * MARGIN
            if never or (fits and promising):
                k, probe = deeper, True
                # never drafted: one step at every position (a random-weight model would pay a burst there)
                self.burst_k, self.burst_left = deeper, 0 if never else PROBE_BURST - 1
            self.next_probe = self.step + self.interval
            self.interval = min(2 * self.interval, PROBE_MAX)
        self.step += 1
        choice = Choice(k, tokens[k], ms[k], ms[0], probe)
        if not probe and not self.burst_left:
            # Kept for a few steps: nothing it depends on moves much in one step (a sequence's acceptance
            # fades over ~20), and recomputing it was ~15 us of a ~1.2 ms step on the embedded model, run
            # cold after the trunk pass (5 us alone).
            self.kept_until = self.step + (RECHECK if best == 0 else RECHECK_DRAFTING) - 1
            self.kept = (key, choice)
        return choice

    def row_depth(self, row: SequenceAcceptance, choice: Choice, batch: int) -> int:
        """How many of the pass's `choice.k` drafts one row should take. The pass is choice.k + 1 wide
        whatever this row does, so a row drafting k pays only its own k MTP calls (`mtp` ms each) and
        gains E_r(k) - 1 tokens; those milliseconds would buy the step's rate in tokens elsewhere. A row
        whose acceptance is low next to the others' takes fewer drafts, or none. Probes keep their depth."""
        if choice.probe or choice.k == 0 or choice.expected_ms <= 0:
            return choice.k
        mtp = self.costs.at(batch).mtp
        rate = choice.expected_tokens / choice.expected_ms  # tokens per ms of this step, all rows
        e = expected_tokens(row.rates()[: choice.k])
        return max(range(choice.k + 1), key=lambda k: e[k] - 1 - k * mtp * rate)

    def _optimistic_rate(self, active: list[int], k: int, ms: float, doubt_cost: bool) -> float:
        """Tokens per ms of drafting k with acceptance PROBE_OPTIMISM / sqrt(rows) higher and, where
        `doubt_cost`, the step COST_OPTIMISM cheaper."""
        up = PROBE_OPTIMISM / len(active) ** 0.5
        tokens = sum(expected_tokens([min(1.0, a + up) for a in self.rows[r].rates()[:k]])[k] for r in active)
        return tokens / (ms * (1 - COST_OPTIMISM if doubt_cost else 1.0))

