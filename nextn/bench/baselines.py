"""transformers' eager greedy `generate` on the artifact's source checkpoint: the baseline every figure
is compared with, measured in the same process on the same prompts and thread count.

`use_mtp=True` is transformers' own MTP speculative decoding (batch 1 only there). EOS is ignored so
every run generates `gen_len` tokens, as in nextn's runs. A streamer timestamps each emitted chunk,
which gives TTFT and per-token latency the same way as nextn's step records.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from nextn.bench.latency import BenchConfig, batch_of, percentiles
from nextn.errors import NextnError

log = logging.getLogger(__name__)


def load_transformers(checkpoint: Path):
    """transformers' DeepseekV3ForCausalLM (fp32, eval) with the checkpoint's MTP layers ignored by the
    trunk (its class ignores only DeepSeek-V3's layer 61); `generate(use_mtp=True)` loads them itself."""
    try:
        import torch
        import transformers
        from transformers import DeepseekV3ForCausalLM
    except ImportError:
        raise NextnError("--baseline transformers needs transformers: pip install transformers==5.24.0") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cfg = json.loads((checkpoint / "config.json").read_text())
    first = cfg["num_hidden_layers"]
    last = first + cfg.get("num_nextn_predict_layers", 0)
    pattern = "|".join(str(i) for i in range(first, last)) or str(first)

    class Trunk(DeepseekV3ForCausalLM):
        _keys_to_ignore_on_load_unexpected = [rf"model\.layers\.({pattern})\..*"]

    return Trunk.from_pretrained(checkpoint, dtype=torch.float32).eval(), last - first


class _Clock:
    """A generate() streamer that only records when each chunk of tokens arrived."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def put(self, value) -> None:
        self.marks.append((time.perf_counter(), value.shape[-1] if value.dim() > 1 else value.numel()))

    def end(self) -> None:
        pass


def transformers_run(model, prompts, batch: int, use_mtp: bool, cfg: BenchConfig, run: int) -> dict:
    """Greedy generation number `run` with transformers' eager generate (use_mtp: its MTP decoding)."""
    import torch

    ids = torch.tensor(batch_of(prompts, run, batch))  # equal-length prompts: no padding needed
    clock = _Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=cfg.gen_len, min_new_tokens=cfg.gen_len, do_sample=False,
                             eos_token_id=None, pad_token_id=0, use_mtp=use_mtp or None, streamer=clock)  # fmt: skip
    total = (time.perf_counter() - t0) * 1e3
    new = out.shape[1] - ids.shape[1]
    marks = clock.marks[1:]  # the first put is the prompt
    ttft = (marks[0][0] - t0) * 1e3 if marks else total
    step_ms = [(b[0] - a[0]) * 1e3 for a, b in zip(marks, marks[1:])]
    step_tokens = [n for _, n in marks[1:]]
    return {"total_ms": total, "ttft_ms": ttft, "new_tokens": new, "step_ms": step_ms, "step_tokens": step_tokens,
            "token_ids": out[0, ids.shape[1]:].tolist(), "batch": batch}  # fmt: skip


def summarize_transformers(runs: list[dict]) -> dict:
    token_lat = [ms / n for r in runs for ms, n in zip(r["step_ms"], r["step_tokens"]) for _ in range(n)]
    return {
        "ttft_ms": percentiles(r["ttft_ms"] for r in runs),
        "tpot_ms": percentiles((r["total_ms"] - r["ttft_ms"]) / max(1, r["new_tokens"] - 1) for r in runs),
        "token_latency_ms": percentiles(token_lat),
        "tokens_per_s": percentiles(r["batch"] * r["new_tokens"] / (r["total_ms"] / 1e3) for r in runs),
        "ms_per_token": percentiles(r["total_ms"] / r["new_tokens"] for r in runs),
        "runs": runs,
    }
