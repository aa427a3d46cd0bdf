"""The quality report of a quantized artifact against the fp32 artifact it came from.

  trunk     top-1 agreement and KL(fp32 || quantized) of the next-token distributions at every position
            of the evaluation sequences (teacher forced: both graphs see the same tokens), perplexity of
            both on those sequences
  drafting  greedy decoding with K = number of MTP modules on the first half of each evaluation
            sequence, both artifacts: acceptance per draft position and mean acceptance length
  speed     the same greedy runs at K = 0 and K: median TPOT and tokens/s of both, interleaved (fp32
            then quantized per prompt) so machine noise hits both alike
  size      bytes of both artifacts
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from nextn.export import io

GEN_TOKENS = 64  # new tokens per greedy run of the report
ROWS = 64  # positions whose float64 log-probabilities are held at once


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _trunk_logits(engines, ids: list[int], cfg: dict) -> np.ndarray:
    """Logits [n, V] of one sequence, one prefill call on an empty cache."""
    n = len(ids)
    empty = [(np.zeros((1, 0, cfg["kv_lora_rank"]), np.float32), np.zeros((1, 0, cfg["qk_rope_head_dim"]), np.float32))
             for _ in range(cfg["num_hidden_layers"])]  # fmt: skip
    feed = io.trunk_feed(np.asarray([ids], np.int64), np.arange(n)[None], np.ones((1, n), np.int64), empty)
    return io.split_trunk(engines["trunk"].run(feed)).logits[0]


def agreement(base, quant, sequences: list[list[int]], cfg: dict) -> dict:
    """Top-1 agreement, KL and perplexities over every position of `sequences`. `base`: the fp32 artifact's
    engines, or the fp32 logits [n, V] of each sequence in order (model/streamed.py)."""
    base_logits = (_trunk_logits(base, ids, cfg) for ids in sequences) if isinstance(base, dict) else base
    same = total = 0
    kl, nll_base, nll_quant = [], [], []
    for ids, logits in zip(sequences, base_logits, strict=True):
        quant_logits = _trunk_logits(quant, ids, cfg)  # [n, V]
        n = len(ids)
        for lo in range(0, n, ROWS):  # float64 over [ROWS, V] at a time, not [n, V]: the same figures
            hi = min(lo + ROWS, n)
            lp, lq = _log_softmax(logits[lo:hi]), _log_softmax(quant_logits[lo:hi])
            same += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            kl += (np.exp(lp) * (lp - lq)).sum(-1).tolist()
            rows = np.arange(lo, min(hi, n - 1))  # positions with a next token
            nxt = np.asarray(ids)[rows + 1]
            nll_base += (-lp[rows - lo, nxt]).tolist()
            nll_quant += (-lq[rows - lo, nxt]).tolist()
        total += n
    kl_arr = np.asarray(kl)
    return {
        "top1_agreement": same / total,
        "kl_mean": float(kl_arr.mean()),
        "kl_p99": float(np.percentile(kl_arr, 99)),
        "perplexity_fp32": float(np.exp(np.mean(nll_base))),
        "perplexity": float(np.exp(np.mean(nll_quant))),
        "positions": total,
    }


def decoding(base, quant, sequences: list[list[int]], draft: int, tick: Callable[[], None] | None = None) -> dict:
    """Greedy runs of both artifacts at K = 0 and K = `draft` (interleaved): acceptance and speed."""
    from nextn.bench.latency import summarize
    from nextn.runtime.decoder import Decoder

    decoders = {"fp32": Decoder(base), "quantized": Decoder(quant)}
    drafts = sorted({0, draft})
    runs = {(who, k): [] for who in decoders for k in drafts}
    for ids in sequences:
        prompt = ids[: max(1, len(ids) // 2)]
        for k in drafts:
            for who, dec in decoders.items():
                _, stats = dec.generate(prompt, GEN_TOKENS, draft=k)
                runs[who, k].append([stats.to_dict()])
        if tick:
            tick()
    out: dict = {"draft": draft, "prompts": len(sequences), "new_tokens": GEN_TOKENS}
    for who in decoders:
        out[who] = {}
        for k in drafts:
            s = summarize(runs[who, k], k)
            out[who][f"K={k}"] = {
                "tpot_ms": s["tpot_ms"]["median"],
                "tokens_per_s": 1e3 / s["tpot_ms"]["median"],
                "mean_acceptance_length": s["mean_acceptance_length"],
                "accepted_per_position": s["accepted_per_position"],
            }
    out["speedup"] = {f"K={k}": out["fp32"][f"K={k}"]["tpot_ms"] / out["quantized"][f"K={k}"]["tpot_ms"]
                      for k in drafts}  # fmt: skip
    return out


def artifact_bytes(manifest: dict) -> int:
    """Its files' bytes; a deferred export's weights (export --quantize: never written) at their size."""
    deferred = manifest["weights"]["bytes"] if manifest["weights"].get("deferred") else 0
    return sum(f["bytes"] for f in manifest["files"].values()) + deferred


def format_report(r: dict) -> str:
    """The report as the lines `nextn calibrate` prints."""
    t = r["trunk"]
    s = r["scheme"]
    lines = [
        f"scheme      trunk {s['trunk']}, MTP {s['mtp']} (activations: {r['method']}; int4 weights: "
        f"{r['weight_method']}, block {r['block_size']})",
        f"data        calibration: {r['calibration']['sequences']} sequences, {r['calibration']['tokens']} tokens "
        f"({r['calibration']['source']})",
        f"            evaluation: {t['positions']} positions ({r['evaluation']['source']})",
        f"trunk       top-1 agreement {t['top1_agreement']:.4f} (threshold {r['threshold']:.2f}), "
        f"KL mean {t['kl_mean']:.2e} p99 {t['kl_p99']:.2e}",
        f"perplexity  fp32 {t['perplexity_fp32']:.3f} -> {t['perplexity']:.3f}",
    ]
    d = r.get("decoding")
    if d:
        k = f"K={d['draft']}"
        if d["draft"]:
            for who in ("fp32", "quantized"):
                a = d[who][k]
                pp = ", ".join(f"{x:.2f}" for x in a["accepted_per_position"])
                lines.append(f"acceptance  {who:<9} [{pp}], mean acceptance length {a['mean_acceptance_length']:.2f}")
        for kk in d["speedup"]:
            lines.append(f"decode {kk:<4} {d['fp32'][kk]['tokens_per_s']:7.1f} -> {d['quantized'][kk]['tokens_per_s']:7.1f} "
                         f"tok/s ({d['speedup'][kk]:.2f}x; median TPOT over {d['prompts']} prompts)")  # fmt: skip
    z = r["size"]
    lines.append(f"size        {z['fp32_bytes'] / 2**20:.1f} MiB -> {z['bytes'] / 2**20:.1f} MiB ({z['ratio']:.2f}x smaller)")
    if r.get("attention_bf16"):
        lines.append(f"attention   kv_b_proj of {r['attention_bf16']} layer(s) rounded to bf16 values (read as bf16)")
    if r["kept_float"]:
        lines.append(f"kept float  {len(r['kept_float'])} linear(s) / fused MoE node(s): " + "; ".join(
            f"{x['graph']}/{x['node']} ({x['reason']})" for x in r["kept_float"][:4]) + (" ..." if len(r["kept_float"]) > 4 else ""))  # fmt: skip
    return "\n".join(lines)
