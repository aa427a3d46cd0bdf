"""nextn's own runs: every (backend, batch, K) on the same prompts, warm-up then repeated runs.

EOS is ignored so every run generates exactly `gen_len` tokens (runs of different lengths are not
comparable). Per-token latency samples come from each verify step: a step of `ms` that emitted `n`
tokens contributes n samples of ms / n, so drafting shows up in the percentiles as it does to a reader
of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from nextn.errors import NextnError

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BenchConfig:
    drafts: tuple[int | str, ...] = (0, 1, 2, 3, "auto")  # fixed K, or "auto" (the runtime's controller)
    batches: tuple[int, ...] = (1,)
    prompt_len: int = 64
    gen_len: int = 128
    backends: tuple[str, ...] = ("ort",)
    baselines: tuple[str, ...] = ()  # "transformers"
    warmup: int = 1
    repeats: int = 5
    threads: int = 1


def percentiles(values) -> dict:
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"median": None, "p90": None, "p99": None, "mean": None, "n": 0}
    return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)),
            "mean": float(v.mean()), "n": int(v.size)}  # fmt: skip


# -- prompts ---------------------------------------------------------------------------------------
def load_prompts(path: Path | None, tokenizer, vocab: int, prompt_len: int, n: int) -> list[list[int]]:
    """Prompts as token ids, each at most `prompt_len` tokens.

    FILE: any format of nextn/prompts.py (text with one prompt per line, .jsonl, .ids). Default: the first
    `prompt_len` tokens of the Python standard library's held-out files (the embedded model never trained
    on them), or seeded random ids when the artifact has no tokenizer.
    """
    from nextn.prompts import read_sequences, stdlib_sequences

    if path is not None:
        return read_sequences([Path(path)], tokenizer, vocab, prompt_len, "--prompts")
    if tokenizer is not None:
        prompts = stdlib_sequences(tokenizer, "heldout", n, prompt_len)
    else:
        rng = np.random.default_rng(0)
        prompts = [rng.integers(2, vocab, size=prompt_len).tolist() for _ in range(n)]
    if not prompts:
        raise NextnError(f"--prompt-len {prompt_len}: no held-out stdlib file is that long; give --prompts")
    return prompts


# -- runs ------------------------------------------------------------------------------------------
def batch_of(prompts: list[list[int]], run: int, batch: int) -> list[list[int]]:
    """The prompts of run `run`: consecutive, wrapping around, so runs cycle through the set."""
    return [prompts[(run * batch + j) % len(prompts)] for j in range(batch)]


def one_run(model, prompts: list[list[int]], batch: int, draft: int, cfg: BenchConfig, run: int) -> list[dict]:
    """Generation number `run` at one (batch, K): the stats of each batch row."""
    group = batch_of(prompts, run, batch)
    res = model.generate(group if batch > 1 else group[0], max_new_tokens=cfg.gen_len, draft=draft)
    return [r.stats for r in (res if isinstance(res, list) else [res])]


def summarize(runs: list[list[dict]], draft: int | str) -> dict:
    """runs: per run, the stats of each batch row (see runtime.decoder.Stats.to_dict). `draft`: the K
    asked for, or "auto" (positions then as many as the stats record)."""
    if draft == "auto":
        draft = max((len(s["drafted_per_position"]) for rows in runs for s in rows), default=0)
    token_lat, drafted, accepted = [], np.zeros(draft), np.zeros(draft)
    steps = acc = 0
    for rows in runs:
        for s in rows:
            for ms, n in zip(s["step_ms"], s["step_tokens"]):
                token_lat += [ms / n] * n
            steps += s["steps"]
            acc += s["accepted"]
            for i, d in enumerate(s["drafted_per_position"][:draft]):
                drafted[i] += d
                accepted[i] += round(s["accepted_per_position"][i] * d)
    total_ms = [rows[0]["time_ms"]["total"] for rows in runs]
    new_tokens = [sum(s["new_tokens"] for s in rows) for rows in runs]
    host = sum(s["time_ms"]["host"] for rows in runs for s in rows[:1])
    return {
        "ttft_ms": percentiles(rows[0]["ttft_ms"] for rows in runs),
        "tpot_ms": percentiles(np.mean([s["tpot_ms"] for s in rows]) for rows in runs),
        "token_latency_ms": percentiles(token_lat),
        "tokens_per_s": percentiles(n / (ms / 1e3) for n, ms in zip(new_tokens, total_ms)),
        "ms_per_token": percentiles(ms / (n / len(rows)) for ms, n, rows in zip(total_ms, new_tokens, runs)),
        "mean_acceptance_length": 1 + acc / steps if steps else 1.0,
        "accepted_per_position": [float(a / d) if d else 0.0 for a, d in zip(accepted, drafted)],
        "drafted_per_position": drafted.astype(int).tolist(),
        "host_fraction": host / sum(total_ms) if total_ms else 0.0,
        "draft_histogram": draft_histogram(runs),
        "runs": runs,
    }


def draft_histogram(runs: list[list[dict]]) -> dict[str, int]:
    """Steps per K over all runs (each run's first row: the rows of a batch share their steps' K)."""
    out: dict[str, int] = {}
    for rows in runs:
        for k, n in rows[0].get("draft_histogram", {}).items():
            out[k] = out.get(k, 0) + n
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))
