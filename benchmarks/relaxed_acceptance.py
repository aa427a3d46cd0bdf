"""Relaxed acceptance (opt-in, lossy): what it buys in acceptance and what it costs in top-1 agreement.

    python benchmarks/relaxed_acceptance.py [ARTIFACT] [--draft 3] [--prompts 16] [--gen-len 128]
    (no artifact: the embedded model's fp32 export)

For each held-out stdlib prompt (EOS ignored): greedy with exact acceptance, then with relaxed acceptance at a
few (top N, delta) settings, all at the same fixed K. Reported per setting: acceptance per draft position,
mean acceptance length, TPOT against exact (interleaved), and the top-1 agreement of the relaxed output:
the share of its tokens that are the trunk's own argmax given the tokens before them (checked by running
the trunk over prompt + output once). Exact acceptance gives 1.0 by construction.
"""

import argparse
import statistics

import numpy as np

import nextn
from nextn.export import io
from nextn.bench.latency import load_prompts
from nextn.embedded import embedded_artifact

SETTINGS = [(2, 0.3), (3, 0.5), (5, 1.0), (10, 2.0)]


def top1_agreement(model, prompt: list[int], new: list[int]) -> float:
    """Share of `new` that is the trunk's argmax after prompt + the new tokens before it."""
    ids = prompt + new
    eng, c = model.engines["trunk"], model.engines.manifest["config"]
    empty = [(np.zeros((1, 0, c["kv_lora_rank"]), np.float32), np.zeros((1, 0, c["qk_rope_head_dim"]), np.float32))
             for _ in range(c["num_hidden_layers"])]  # fmt: skip
    feed = io.trunk_feed(np.asarray([ids[:-1]]), np.arange(len(ids) - 1)[None], np.ones((1, len(ids) - 1), np.int64),
                         empty)  # fmt: skip
    argmax = io.split_trunk(eng.run(feed)).logits[0].argmax(-1)  # [T-1]: the argmax after each prefix
    want = argmax[len(prompt) - 1 :]
    return float(np.mean(want == np.asarray(new)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", nargs="?")
    ap.add_argument("--draft", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--gen-len", type=int, default=128)
    args = ap.parse_args()
    with nextn.load(args.artifact or embedded_artifact(), threads=1) as model:
        model.eos_ids = ()
        prompts = load_prompts(None, model.tokenizer, model.engines.manifest["config"]["vocab_size"], 64, args.prompts)
        model.generate(prompts[0], max_new_tokens=16, draft=args.draft)
        rows = {"exact": []} | {f"top {n}, delta {d}": [] for n, d in SETTINGS}
        for p in prompts:
            for name in rows:
                kw = {} if name == "exact" else dict(zip(("relaxed_top", "relaxed_delta"), SETTINGS[list(rows).index(name) - 1]))
                r = model.generate(p, max_new_tokens=args.gen_len, draft=args.draft,
                                   **({"accept": "relaxed", **kw} if kw else {}))  # fmt: skip
                rows[name].append((r.stats, top1_agreement(model, p, r.token_ids)))
    exact_tpot = [s["tpot_ms"] for s, _ in rows["exact"]]
    for name, runs in rows.items():
        drafted = np.sum([s["drafted_per_position"] for s, _ in runs], axis=0)
        accepted = np.sum([np.asarray(s["accepted_per_position"]) * s["drafted_per_position"] for s, _ in runs], axis=0)
        length = statistics.mean(s["mean_acceptance_length"] for s, _ in runs)
        speed = statistics.median(e / s["tpot_ms"] for e, (s, _) in zip(exact_tpot, runs))
        agree = statistics.mean(a for _, a in runs)
        print(f"{name:<18} acceptance per position {np.round(accepted / np.maximum(drafted, 1), 2).tolist()}, "
              f"mean acceptance length {length:.2f}, TPOT vs exact {speed:.2f}x, top-1 agreement {agree:.3f}")


if __name__ == "__main__":
    main()
