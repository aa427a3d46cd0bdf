"""One benchmark run: nextn at every (backend, batch, K) and the baselines, on the same prompts, round by round."""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nextn.bench.latency import BenchConfig, Progress, load_prompts, one_run, summarize
from nextn.bench.machine import machine_info
from nextn.errors import NextnError
from nextn.runtime.costs import BatchCosts, calibrate

log = logging.getLogger(__name__)


def run_bench(artifact: str | Path, cfg: BenchConfig, prompts_file: Path | None = None,
              progress: Progress | None = None) -> dict:  # fmt: skip
    import torch

    import nextn
    from nextn.export.manifest import read_manifest

    artifact = Path(artifact)
    manifest = read_manifest(artifact, verify=False)
    n_mtp = manifest["config"]["num_nextn_predict_layers"]
    fixed = [k for k in cfg.drafts if k != "auto"]
    if max(fixed, default=0) > 0 and n_mtp == 0:
        raise NextnError(f"--draft {max(fixed)}: {artifact} has no MTP module")
    if min(fixed, default=0) < 0 or min(cfg.batches) < 1 or cfg.repeats < 1 or cfg.gen_len < 2 or cfg.prompt_len < 1:
        raise NextnError("--draft must be auto or >= 0; --batch, --repeats, --prompt-len >= 1; --gen-len >= 2")
    if cfg.threads < 0:
        raise NextnError(f"--threads {cfg.threads}: must be >= 0 (0: each backend's default)")
    if cfg.threads:  # the transformers baseline and the torch backend; 0 leaves torch's default
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    costs: dict[tuple[str, int], BatchCosts] = {}
    with contextlib.ExitStack() as stack:
        rows: list[_Row] = []
        prompts = None
        for backend in cfg.backends:
            model = stack.enter_context(nextn.load(artifact, backend=backend, threads=cfg.threads))
            model.eos_ids = ()  # every run generates exactly gen_len tokens
            # The ceiling: real decode steps at every fixed K, timed in this run (runtime.costs.calibrate).
            depth = max(model.decoder.depth(k) for k in cfg.drafts)
            for batch in cfg.batches:
                costs[backend, batch] = calibrate(model.decoder._timing_run, batch, depth)
            if prompts is None:
                prompts = load_prompts(prompts_file, model.tokenizer, manifest["config"]["vocab_size"],
                                       cfg.prompt_len, max(8, max(cfg.batches) * (cfg.warmup + cfg.repeats)))  # fmt: skip
            for batch in cfg.batches:
                for k in cfg.drafts:
                    rows.append(_Row({"backend": backend, "batch": batch, "draft": k},
                                     functools.partial(one_run, model, prompts, batch, k, cfg),
                                     functools.partial(summarize, draft=k)))  # fmt: skip
        if "transformers" in cfg.baselines:
            from nextn.bench.baselines import load_transformers, summarize_transformers, transformers_run

            hf, hf_mtp = load_transformers(Path(manifest["source"]))
            for batch in cfg.batches:
                rows.append(_Row({"backend": "transformers", "batch": batch, "draft": 0},
                                 functools.partial(transformers_run, hf, prompts, batch, False, cfg),
                                 summarize_transformers))  # fmt: skip
            if hf_mtp:  # transformers' MTP decoding runs batch 1 only
                rows.append(_Row({"backend": "transformers+mtp", "batch": 1, "draft": hf_mtp},
                                 functools.partial(transformers_run, hf, prompts, 1, True, cfg),
                                 summarize_transformers))  # fmt: skip
        total = len(rows) * (cfg.warmup + cfg.repeats)
        # Round by round: every row runs once per round, so this VM's bursts of noise land on all rows
        # (and on both sides of every ratio) alike instead of on whichever row ran during them.
        for i in range(cfg.warmup + cfg.repeats):
            # each round starts one row later, so no row always follows the same one (a run finds the CPU
            # caches as the run before left them; measured up to 5% on a row that always followed K = 3)
            for j, row in enumerate(rows[i % len(rows) :] + rows[: i % len(rows)]):
                out = row.run(run=i)
                if i >= cfg.warmup:
                    row.runs.append(out)
                if progress:
                    progress(f"round {i + 1}: {row.label['backend']} batch {row.label['batch']} "
                             f"K={row.label['draft']}", i * len(rows) + j + 1, total)  # fmt: skip
        results = [{**row.label, **row.summarize(row.runs)} for row in rows]

    _speedups(results)
    _ceiling(results, costs)
    return {
        "artifact": str(artifact),
        "checkpoint": manifest.get("source"),
        "dtype": manifest["dtype"],
        "machine": machine_info(cfg.threads),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()},
        "prompts": {"source": str(prompts_file) if prompts_file else "default", "count": len(prompts),
                    "lengths": [len(p) for p in prompts]},  # fmt: skip
        "eos": "ignored (every run generates gen_len tokens)",
        "step_costs": {f"{b}, batch {n}": {"step_ms_per_K": c.step, "ratio_to_K0": c.ratio, "trunk_ms_per_K": c.trunk,
                                           "mtp_ms_per_draft": c.mtp, "host_ms": c.host}
                       for (b, n), c in costs.items()},  # fmt: skip
        "results": results,
        "ratios": _ratios(results),
        "seconds": round(time.perf_counter() - t0, 1),
    }


@dataclass
class _Row:
    """One table row: its label, one generation (by run number) and the summary of its runs."""

    label: dict
    run: Callable
    summarize: Callable
    runs: list = field(default_factory=list)


def _ceiling(results: list[dict], costs: dict[tuple[str, int], BatchCosts]) -> None:
    """Each nextn row's projected speedup (from the step costs measured in the run) and its efficiency."""
    for r in results:
        c = costs.get((r["backend"], r["batch"]))
        if c is not None:
            r["projected_speedup"] = projected_speedup(r["runs"], c, r["batch"])
            r["efficiency"] = r["speedup_vs_k0"] / r["projected_speedup"] if r.get("speedup_vs_k0") else None


def projected_speedup(runs: list[list[dict]], costs: BatchCosts, b: int) -> float:
    """The speedup over K = 0 this row's own steps (their K and the tokens each emitted) would show at the
    step costs c(b, K) measured in the same run (runtime/costs.py): tokens / sum_t c(b, K_t) against
    b / c(b, 0) (every row emits one token per plain step)."""
    tokens = ms = 0.0
    for rows in runs:
        for t in range(max(len(s["step_draft"]) for s in rows)):
            k = max(s["step_draft"][t] for s in rows if t < len(s["step_draft"]))  # the step's verify width - 1
            ms += costs.step[min(k, len(costs.step) - 1)]
        tokens += sum(sum(s["step_tokens"]) for s in rows)
    return tokens / ms * costs.step[0] / b if ms else 1.0


def _speedups(results: list[dict]) -> None:
    """speedup_vs_k0: the median over rounds of K = 0's TPOT over this K's in the same round (same backend
    and batch): rounds are paired, so this VM's drift between rounds cancels (a ratio of medians moved
    by up to 10% between identical runs); speedup_range: the lowest and highest round."""
    base = {(r["backend"], r["batch"]): r for r in results if r["draft"] == 0}
    for r in results:
        b = base.get((r["backend"], r["batch"]))
        if b is None:
            r["speedup_vs_k0"] = None
            continue
        ratios = [_run_tpot(x) / _run_tpot(y) for x, y in zip(b["runs"], r["runs"])]
        r["speedup_vs_k0"] = statistics.median(ratios)
        r["speedup_range"] = [min(ratios), max(ratios)]


def _run_tpot(run: list[dict] | dict) -> float:
    """One run's TPOT: nextn's (a list of batch rows' stats) averaged over rows; a baseline's (a dict) as is."""
    if isinstance(run, dict):
        return (run["total_ms"] - run["ttft_ms"]) / max(1, run["new_tokens"] - 1)
    return sum(s["tpot_ms"] for s in run) / len(run)


def _ratios(results: list[dict]) -> list[dict]:
    """Each nextn backend against the baselines, per batch: plain vs plain, best K vs transformers' MTP."""
    out = []
    find = {(r["backend"], r["batch"], r["draft"]): r for r in results}
    for r in results:
        if r["backend"] in ("transformers", "transformers+mtp") or r["draft"] != 0:
            continue
        b = r["batch"]
        best = max((x for x in results if x["backend"] == r["backend"] and x["batch"] == b),
                   key=lambda x: x["speedup_vs_k0"])  # fmt: skip
        auto = find.get((r["backend"], b, "auto"))
        out.append({"backend": r["backend"], "batch": b, "best_draft": best["draft"],
                    "best_speedup_vs_k0": best["speedup_vs_k0"], "auto_vs_k0": auto["speedup_vs_k0"] if auto else None})  # fmt: skip
        hf = find.get(("transformers", b, 0))
        if hf:
            out[-1]["vs_transformers"] = hf["tpot_ms"]["median"] / r["tpot_ms"]["median"]
        mtp = next((x for x in results if x["backend"] == "transformers+mtp" and x["batch"] == b), None)
        if mtp:
            out[-1]["vs_transformers_mtp"] = mtp["tpot_ms"]["median"] / best["tpot_ms"]["median"]
    return out
