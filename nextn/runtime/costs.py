"""What one decode step costs on this machine, for the draft controller (controller.py).

    c(b, K) = trunk(b, K+1) + b * K * mtp + host(b)      milliseconds

trunk(b, w): one trunk pass of w new tokens per row for b rows (w = 1 + K: the verify width); mtp: one
drafted token, its MTP call and the Python around it (catch-up rows ride along); host(b): everything
else in a step (acceptance, bookkeeping).

Measured by a short calibration the first time an artifact runs with draft="auto" at a batch size:
a few real decode steps at every fixed K from a random prompt, through the decoder itself, medians
over interleaved rounds. Refined online from the timings the decoder takes anyway (an exponential moving average per
quantity), and saved per artifact and machine under <cache>/costs/ when the model closes, so the next
process starts from the refined figures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

CALIB_PROMPT = 32  # tokens of the random calibration prompt
CALIB_STEPS = 6  # decode steps per K and round
CALIB_SECONDS = 0.4  # time budget of one batch size's calibration (at least 2 rounds are always run)
EMA = 0.15  # weight of each new online observation of a quantity
DRIFT = 0.05  # weight of each trunk observation in the machine-wide speed factor applied to all quantities


@dataclass
class BatchCosts:
    trunk: list[float]  # trunk[w - 1]: ms of one pass at verify width w
    host: float  # ms per step outside the engine calls


@dataclass
class StepCosts:
    """Milliseconds of a step's parts, per batch size, plus one MTP call."""

    mtp: float
    batches: dict[int, BatchCosts]


class CostModel:
    """Step costs from a calibration (lazy, per batch size), refined online, saved per artifact and machine."""

    def __init__(self, run: Callable[[int, int, int], list], max_width: int, cache_file: Path | None = None):
        self.run, self.max_width, self.cache_file = run, max_width, cache_file
        self.costs: StepCosts | None = None
        self.acceptance: dict | None = None  # artifact-wide acceptance counts saved beside the costs
        self.changed = False
        if cache_file is not None and cache_file.is_file():
            self._load(cache_file)

    # -- the model ---------------------------------------------------------------------------------
    def at(self, b: int) -> BatchCosts:
        if self.costs is None or b not in self.costs.batches or len(self.costs.batches[b].trunk) < self.max_width:
            measured = calibrate(self.run, b, self.max_width)
            if self.costs is None:
                self.costs = StepCosts(measured.mtp, {})
            self.costs.batches[b] = measured.batches[b]
            self.changed = True
        return self.costs.batches[b]

    def step_ms(self, b: int, k: int, drafting: int | None = None) -> float:
        """One step of a trunk pass over b rows at width k + 1, `drafting` rows (default b) drafting k each."""
        c = self.at(b)
        return c.trunk[k] + (b if drafting is None else drafting) * k * self.costs.mtp + c.host

    # -- online refinement -------------------------------------------------------------------------
    def observe(self, b: int, width: int, trunk_ms: float, mtp_calls: int, mtp_ms: float, host_ms: float) -> None:
        """One decode step at batch b: its trunk pass, its MTP calls (total ms) and the rest of its time."""
        c = self.at(b)
        if width <= len(c.trunk):
            # This VM drifts 10-30%: a trunk pass slower or faster than expected moves every quantity a
            # little (the ones not observed lately would otherwise compare stale figures with fresh ones),
            # and its own entry by EMA.
            factor = (trunk_ms / c.trunk[width - 1]) ** DRIFT if trunk_ms > 0 and c.trunk[width - 1] > 0 else 1.0
            self._scale(factor)
            c.trunk[width - 1] += EMA * (trunk_ms - c.trunk[width - 1])
        if mtp_calls:
            self.costs.mtp += EMA * (mtp_ms / mtp_calls - self.costs.mtp)
        c.host += EMA * (max(0.0, host_ms) - c.host)
        self.changed = True

    def _scale(self, factor: float) -> None:
        self.costs.mtp *= factor
        for c in self.costs.batches.values():
            c.trunk = [x * factor for x in c.trunk]
            c.host *= factor

    # -- the cache file ----------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
            batches = {int(b): BatchCosts([float(x) for x in c["trunk"]], float(c["host"]))
                       for b, c in doc["batches"].items()}  # fmt: skip
            self.costs = StepCosts(float(doc["mtp"]), batches)
            self.acceptance = doc.get("acceptance")
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable cost cache %s", path)
            self.costs = None

    def save(self) -> None:
        """Write the refined costs (and acceptance) atomically; a cache that cannot be written is skipped."""
        if self.cache_file is None or self.costs is None or not self.changed:
            return
        doc = {"mtp": self.costs.mtp, "batches": {str(b): asdict(c) for b, c in self.costs.batches.items()},
               "acceptance": self.acceptance}  # fmt: skip
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(self.cache_file)
            self.changed = False
        except OSError as e:
            log.warning("could not save step costs to %s: %s", self.cache_file, e)


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


# -- calibration -----------------------------------------------------------------------------------
def calibrate(run: Callable[[int, int, int], list], b: int, max_width: int) -> StepCosts:
    """Time real decode steps: `run(b, k, steps)` decodes `steps` steps at a fixed K = k for b rows (a
    random prompt: what acceptance comes out does not matter, every step drafts k) and returns the rows'
    Stats. Every K in interleaved rounds within CALIB_SECONDS (at least 2 rounds); medians. The steps run
    through the decoder itself, so each graph starts as warm or cold in the CPU caches as in decoding,
    and the Python around the calls is counted."""
    trunk = {w: [] for w in range(1, max_width + 1)}
    mtp: list[float] = []
    host: list[float] = []
    start, rounds = time.perf_counter(), 0
    while rounds < 2 or (time.perf_counter() - start < CALIB_SECONDS and rounds < 9):
        for w in trunk:
            s = run(b, w - 1, CALIB_STEPS)[0]
            trunk[w].append(s.decode_trunk_ms / s.steps)
            if s.drafted:
                mtp.append(s.draft_ms / s.drafted)
            host.append((s.total_ms - s.ttft_ms - s.decode_trunk_ms - s.draft_ms) / s.steps)
        rounds += 1
    widths = [statistics.median(trunk[w]) for w in trunk]
    one_mtp = statistics.median(mtp) if mtp else 0.0
    log.info("step costs at batch %d: trunk %s ms, mtp %.3f ms (%d rounds)", b,
             ", ".join(f"{x:.3f}" for x in widths), one_mtp, rounds)  # fmt: skip
    return StepCosts(one_mtp, {b: BatchCosts(widths, statistics.median(host))})
