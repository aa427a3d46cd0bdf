"""What one decode step costs on this machine, for the draft controller (controller.py).

    c(b, K) = milliseconds of one decode step of b rows drafting K tokens each
            = level(b) * ratio(b, K)                          ratio(b, 0) = 1
            = trunk(b, K+1) + b * K * mtp + host              (its parts, kept for the benchmark's ceiling)

trunk(b, w): one trunk pass of w new tokens per row (w = 1 + K: the verify width); mtp: one drafted token,
its MTP call and the Python around it (catch-up rows ride along); host: the rest of a step (acceptance,
bookkeeping). The controller uses c(b, K) as measured whole: the parts do not add up exactly (a graph
runs slower after another graph pushed its weights out of the CPU caches), so what is kept is the
whole step at each K.

Which K is best depends on the ratios only. They are measured by a short calibration the first time an
artifact runs with draft="auto" at a batch size: a few real decode steps at every fixed K from a random
prompt, through the decoder itself, in rounds; each round gives every K's ratio to K = 0 measured
seconds apart (this VM's speed drifts 10-30% within seconds: only such paired ratios hold), and the
median over rounds is kept. Online (decoder.steady says which steps count): plain steps after plain steps
set the level (a plain step just after drafting finds other weights in the CPU caches), the median of the
first LEVEL_SAMPLES after drafting replacing it and later ones moving it by EMA; once auto has opened the
costs, plain steps at a fixed K = 0 count too (engine.py: the same passes, so the same cost); a drafting
step moves its ratio one small step up or down toward what it cost over the level, so the ratio follows the
median of such steps: a calibration that read drafting 20-30% too cheap (this VM can) is raised within a
few dozen steps, and one read too dear comes down (where plain decoding wins, through the controller's
probes, which draft a burst of steps). The online ratios live for the process (saving them was tried:
the level moves only with plain steps, so while drafting the ratios drift against a stale level, and
saved they compounded: 1.72 -> 0.97 for a 2-token step over three bench runs); the
calibration's ratios and the level are saved per artifact and machine under <cache>/costs/ when the model
closes, and the next process starts there, measuring the level again before any ratio moves (the controller
opens with a plain burst: a saved level can be 2x off, and ratios are costs over it).

Tried and dropped: refining per-K figures from unpaired steps (a K = 0 step just after drafting steps read
20-40% high, and the controller then drafted where it lost), and raising a ratio by EMA and never lowering
it (it tracked the noise's upper tail: on this VM it crept up until plain decoding won where K = 1..3 each
measured 1.2-1.3x faster).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

CALIB_PROMPT = 16  # tokens of the random calibration prompt (its prefill is overhead: short)
CALIB_STEPS = 16  # timed decode steps per K and round (fewer, down to 4, where steps are slow: see calibrate)
CALIB_SETTLE = 8  # untimed steps before them: the prompt's MTP catch-up, and the CPU caches settling into
# what a run at that K keeps there (steps just after a switch of K measured 10-30% off on the embedded model)
CALIB_SECONDS = 2.5  # time budget of one batch size's calibration (at least 2 rounds are always run)
EMA = 0.15  # weight of each new online observation of a step's cost
OUTLIER = 2.0  # a plain step is clipped to [1/OUTLIER, OUTLIER] x the level (a VM hiccup is one step)
RATIO_STEP = 1.02  # a drafting step moves its ratio up or down by this factor (from 1.5 to 2.0 in 15 steps)
LEVEL_SAMPLES = 3  # plain steps whose median replaces the level after drafting or a saved one (a plain burst counts 3)


@dataclass
class BatchCosts:
    """Milliseconds at one batch size."""

    level: float  # one plain decode step (K = 0), as the machine runs now
    ratio: list[float]  # ratio[K]: a step drafting K tokens per row, over a plain one (ratio[0] = 1), as calibrated
    trunk: list[float]  # trunk[K]: its trunk pass (width K + 1), as calibrated
    mtp: float  # per drafted token (all rows), as calibrated
    host: float  # per step, outside the engine calls and drafting, as calibrated

    seen: list[float] | None = None  # ratio[K] as refined online in this process (not saved)
    # Whether `level` was measured in this process. A saved level is a start only: it was where the last
    # process left it (a bench saved 1.50 ms where plain steps now took 0.74), and a drafting step's ratio
    # is its cost over the level, so a stale one dragged every ratio with it (auto then drafted at 0.87x).
    # The median of the first LEVEL_SAMPLES plain steps counted sets it (one step can be a hiccup); until
    # then drafting steps move no ratio.
    measured: bool = True
    samples: list[float] = field(default_factory=list)  # plain steps since the last drafting step (not saved)
    since_level: int = 0  # drafting steps counted since the level was set or a level burst began (not saved)

    @property
    def step(self) -> list[float]:
        """step[K]: ms of one decode step drafting K tokens per row."""
        return [self.level * r for r in (self.seen or self.ratio)]


class CostModel:
    """Step costs from a calibration (lazy, per batch size), refined online, saved per artifact and machine."""

    def __init__(self, run: Callable[[int, int, int], list], max_draft: int, cache_file: Path | None = None):
        self.run, self.max_draft, self.cache_file = run, max_draft, cache_file
        self.batches: dict[int, BatchCosts] = {}
        self.acceptance: dict | None = None  # artifact-wide acceptance counts saved beside the costs
        self.changed = False
        if cache_file is not None and cache_file.is_file():
            self._load(cache_file)

    def at(self, b: int) -> BatchCosts:
        if b not in self.batches or len(self.batches[b].ratio) < self.max_draft + 1:
            self.batches[b] = calibrate(self.run, b, self.max_draft)
            self.changed = True
        return self.batches[b]

    def observe(self, b: int, k: int, ms: float) -> None:
        """One decode step of b rows at K = k took `ms` (a step that counts: decoder.steady). Plain steps set the
        level: the median of the first LEVEL_SAMPLES after a drafting step (a level burst) or after a saved level
        replaces it, later ones move it by EMA (clipped to OUTLIER); a drafting step moves its ratio one
        RATIO_STEP toward what it cost. A batch size never calibrated is not observed (plain decoding at a fixed
        K = 0 reports its steps too, and must not start a calibration)."""
        c = self.batches.get(b)
        if c is None or k >= len(c.ratio) or c.level <= 0:
            return
        if k == 0:
            # A level burst's steps replace the level outright: moved by EMA, three of them closed 39% of the
            # gap (and with bursts counted per generate() call, the level stayed where the calibration left it:
            # 0.735 ms while plain steps took 0.57-0.67, and the ratio of whichever K ran drifted with it).
            c.samples.append(ms)
            if not c.measured or len(c.samples) == LEVEL_SAMPLES:
                c.level = statistics.median(c.samples)
                c.measured = len(c.samples) >= LEVEL_SAMPLES
                c.since_level = 0
            elif len(c.samples) > LEVEL_SAMPLES:
                c.level += EMA * (min(max(ms, c.level / OUTLIER), c.level * OUTLIER) - c.level)
            self.changed = True
            return
        if not c.measured:
            return
        c.samples.clear()  # the next plain steps measure the level afresh
        c.since_level += 1
        # The ratio follows the median of what drafting steps cost over the level: a fixed step up or down
        # (a median tracker: a hiccup moves it no more than any other step). Raising it only, by EMA, as
        # 0.2 did, tracked an upper quantile instead: on this VM's noise it crept up step after step until
        # plain decoding won where every fixed K measured faster (BENCHMARKS.md, "Drafting that pays").
        seen = c.seen = c.seen or list(c.ratio)
        seen[k] *= RATIO_STEP if ms / c.level > seen[k] else 1 / RATIO_STEP

    # -- the cache file ----------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
            self.batches = {int(b): BatchCosts(float(c["level"]), [float(x) for x in c["ratio"]],
                                               [float(x) for x in c["trunk"]], float(c["mtp"]), float(c["host"]),
                                               measured=False)
                            for b, c in doc["batches"].items()}  # fmt: skip
            self.acceptance = doc.get("acceptance")
            if not all(math.isfinite(x) and x > 0 for c in self.batches.values() for x in (c.level, *c.ratio)):
                raise ValueError("a cost that is not a positive number")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignoring an unreadable cost cache %s", path)
            self.batches, self.acceptance = {}, None

    def save(self) -> None:
        """Write the refined costs (and acceptance) atomically; a cache that cannot be written is skipped."""
        if self.cache_file is None or not self.batches or not self.changed:
            return
        saved = ("level", "ratio", "trunk", "mtp", "host")
        doc = {"batches": {str(b): {k: v for k, v in asdict(c).items() if k in saved}
                           for b, c in self.batches.items()},
               "acceptance": self.acceptance}  # fmt: skip
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(f".{os.getpid()}.tmp")  # processes sharing the cache do not collide
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(self.cache_file)
            self.changed = False
        except OSError as e:
            log.warning("could not save step costs to %s: %s", self.cache_file, e)


def cost_batch(b: int) -> int:
    """The batch size whose step costs stand for b rows: b up to 4, then the power of two at or below it
    (a calibration per distinct batch size would stall a server at every new size; the ratios between
    K's move slowly with b)."""
    return b if b <= 4 else 1 << (b.bit_length() - 1)


def cost_cache_file(engines) -> Path:
    """<cache>/costs/<key>.json, the key naming the artifact's graphs and weights, the machine and the
    session options (threads, pre-packing) the costs were measured with."""
    from importlib import metadata

    from nextn.bench.machine import cpu_model
    from nextn.embedded import cache_root

    m = engines.manifest
    files = {n: f["sha256"] for n, f in m["files"].items() if n.endswith((".onnx", ".bin"))}
    key = json.dumps({"files": files, "cpu": cpu_model(), "setup": engines.setup,
                      "onnxruntime": metadata.version("onnxruntime"), "nextn": metadata.version("nextn")},
                     sort_keys=True)  # fmt: skip
    return cache_root() / "costs" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def calibrate(run: Callable[[int, int, int], list], b: int, max_draft: int) -> BatchCosts:
    """Time real decode steps: `run(b, k, steps)` decodes `steps` steps at a fixed K = k for b rows (a
    random prompt: what acceptance comes out does not matter, every step drafts k) and returns the
    rows' Stats. Each round runs every K once; a K's ratio is its median step over K = 0's in the same
    round; the median over rounds (at least 3, more within CALIB_SECONDS) is kept. The steps run
    through the decoder itself, so each graph starts as warm or cold in the CPU caches as in decoding,
    and the Python around the calls is counted.

    A model whose plain step takes long (a real checkpoint: tens of ms) gets fewer steps per K, so three
    rounds still fit in about CALIB_SECONDS (its weights do not fit the CPU caches anyway: little to settle)."""
    ks = range(max_draft + 1)
    first = run(b, 0, 3)  # how long a plain step takes here
    plain_ms = statistics.median(max(first, key=lambda x: x.steps).step_ms()[1:])
    per_step = 3 * len(ks) * plain_ms * (1 + max_draft / 2) / 1e3  # seconds per step and K, 3 rounds, verify ~1 + K/2
    timed = int(min(CALIB_STEPS, max(4, CALIB_SECONDS / per_step * 2 / 3)))
    settle = min(CALIB_SETTLE, max(2, timed // 2))
    ratios: dict[int, list[float]] = {k: [] for k in ks}
    level: list[float] = []
    trunk: dict[int, list[float]] = {k: [] for k in ks}
    mtp: list[float] = []
    host: list[float] = []
    start, rounds = time.perf_counter(), 0
    while rounds < 3 or (time.perf_counter() - start < CALIB_SECONDS and rounds < 15):
        step = {}
        for k in ks:
            rows = run(b, k, settle + timed)
            s = max(rows, key=lambda x: x.steps)  # the last row to finish saw every shared step
            step[k] = statistics.median(s.step_ms()[settle:])
            trunk[k].append(s.decode_trunk_ms / s.steps)  # a shared pass counts in every row's trunk time
            drafted = sum(x.drafted for x in rows)
            if drafted:
                mtp.append(sum(x.draft_ms for x in rows) / drafted)
            host.append((s.total_ms - s.ttft_ms - s.decode_trunk_ms - sum(x.draft_ms for x in rows)) / s.steps)
        level.append(step[0])
        for k in ks:
            ratios[k].append(step[k] / step[0])
        rounds += 1
    out = BatchCosts(statistics.median(level), [statistics.median(ratios[k]) for k in ks],
                     [statistics.median(trunk[k]) for k in ks], statistics.median(mtp) if mtp else 0.0,
                     statistics.median(host))  # fmt: skip
    log.info("step costs at batch %d: %.3f ms at K = 0, ratios %s at K = 1..%d (%d rounds of %d + %d steps)", b,
             out.level, ", ".join(f"{x:.2f}" for x in out.ratio[1:]), max_draft, rounds, settle, timed)  # fmt: skip
    return out
