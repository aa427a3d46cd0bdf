"""`nextn demo`: the whole pipeline on the embedded model in one call.

Export (cached), its MTP graphs quantized once to int4 for drafting (the trunk stays fp32, so the output is
the fp32 model's; `drafts="fp32"` keeps the exported ones; with `quant` the whole model is quantized once by
`nextn calibrate` instead), then the same greedy generation
with drafting off and on: the tokens must be
identical (lossless), the drafting run shows per-position acceptance and the speedup. Each mode runs
`repeats` times after a warm-up and the median run is reported, because single runs on a shared
2-core machine are noisy.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

DEFAULT_PROMPT = '''import os


def list_python_files(root):
    """Return the paths of all Python files under root."""
'''


@dataclass
class DemoResult:
    artifact: str
    prompt: str
    text: str  # the generated continuation (same in both modes)
    identical: bool  # drafting changed no token
    draft: int | str  # "auto" or a fixed K
    plain: dict  # stats of the median run without drafting
    drafted: dict  # stats of the median run with drafting
    step_cost: list[float] | None = None  # auto: a step drafting K tokens over a plain one, K = 0.. (this machine)
    quant: str | None = None  # the embedded model's quantization (None: fp32)
    drafts: str = "int4"  # without quant: the MTP graphs' weights (the trunk is fp32 either way)

    def describe(self) -> str:
        if self.quant:
            return f"the embedded model quantized to {self.quant} (trunk and drafts)"
        if self.drafts == "fp32":
            return "the embedded model in fp32 (trunk and drafts as exported)"
        return f"the embedded model: trunk fp32 as exported (the output is fp32's), drafts from {self.drafts} MTP graphs"

    @property
    def speedup(self) -> float:
        return self.plain["tpot_ms"] / self.drafted["tpot_ms"]

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "prompt": self.prompt, "text": self.text, "identical": self.identical,
                "draft": self.draft, "speedup": self.speedup, "plain": self.plain, "drafted": self.drafted,
                "step_cost": self.step_cost, "quant": self.quant, "drafts": self.drafts}  # fmt: skip


def run_demo(
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 160,
    draft: int | str = "auto",
    repeats: int = 5,
    threads: int = 1,
    progress: Callable[[str, int, int], None] | None = None,
    quant: str | None = None,
    drafts: str = "int4",
) -> DemoResult:
    import nextn
    from nextn.embedded import embedded_default, embedded_quantized
    from nextn.errors import NextnError

    if (draft != "auto" and draft < 1) or repeats < 1 or max_new_tokens < 1:
        raise NextnError("--draft (auto or a K), --repeats and --max-new-tokens must be at least 1")

    artifact = embedded_quantized(quant, progress) if quant else embedded_default(drafts, progress)
    with nextn.load(artifact, threads=threads) as model:
        if progress:
            progress("generate", 1, 2 * repeats + 1)
        # Warm-up, untimed, at full length: first-run allocations; for auto, the step-cost calibration (once per
        # artifact and machine) and the controller's first corrections of it (a calibration can read drafting
        # 20-30% cheap on a noisy machine; the first drafting steps then raise the ratios they contradict).
        model.generate(prompt, max_new_tokens=max_new_tokens, draft=draft)
        runs: dict = {0: [], draft: []}
        i = 1
        for _ in range(repeats):
            for k in runs:  # interleaved, so drift on the machine hits both modes alike
                i += 1
                if progress:
                    progress(f"generate (draft {k})", i, 2 * repeats + 1)
                runs[k].append(model.generate(prompt, max_new_tokens=max_new_tokens, draft=k))
        if draft == "auto":  # the ratios the controller decided with (as corrected online)
            costs = model.decoder.costs().at(1)
            ratio = list(costs.seen or costs.ratio)
        else:
            ratio = None
    plain, drafted = (_median_run(runs[0]), _median_run(runs[draft]))
    identical = all(r.token_ids == runs[0][0].token_ids for k in runs for r in runs[k])
    return DemoResult(str(artifact), prompt, plain.text or "", identical, draft, plain.stats, drafted.stats, ratio,
                      quant, drafts)  # fmt: skip


def _median_run(results: list):
    tpot = statistics.median_low(r.stats["tpot_ms"] for r in results)
    return next(r for r in results if r.stats["tpot_ms"] == tpot)
