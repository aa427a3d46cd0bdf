"""One trunk step of several artifacts (e.g. `--moe fused` and `--moe sparse` exports) at 1..5 new tokens.

    nextn export -o /tmp/emb-fused --moe fused && nextn export -o /tmp/emb-sparse --moe sparse
    python benchmarks/moe_forms.py /tmp/emb-fused /tmp/emb-sparse [--past 64] [--rounds 7]

Engines as the runtime opens them (shared weights, 1 thread); each round times every (artifact, S) pair
for 50 calls with new random tokens per call (so different experts are read, as in decoding), rounds
alternate the artifacts; prints medians in ms, each S's cost relative to S = 1 (the verify cost of
drafting S - 1 tokens) and the trunk's node count.
"""

import argparse
import statistics
import time

import numpy as np
import onnx

from nextn.runtime.engines import open_engines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--past", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    engines = [open_engines(a, threads=1) for a in args.artifacts]
    cfg = engines[0].manifest["config"]
    rng = np.random.default_rng(0)
    p, sizes = args.past, (1, 2, 3, 4, 5)
    past = {}
    for i in range(cfg["num_hidden_layers"]):
        past[f"past.{i}.c_kv"] = rng.standard_normal((1, p, cfg["kv_lora_rank"])).astype(np.float32)
        past[f"past.{i}.k_pe"] = rng.standard_normal((1, p, cfg["qk_rope_head_dim"])).astype(np.float32)
    tokens = rng.integers(0, cfg["vocab_size"], (50, max(sizes)))
    times = {(a, s): [] for a in range(len(engines)) for s in sizes}
    for _ in range(args.rounds):
        for a, eng in enumerate(engines):
            for s in sizes:
                feed = {"position_ids": np.arange(p, p + s)[None], "attention_mask": np.ones((1, p + s), np.int64), **past}
                for t in tokens[:5]:  # warm
                    eng["trunk"].run({"input_ids": t[None, :s], **feed})
                t0 = time.perf_counter()
                for t in tokens:
                    eng["trunk"].run({"input_ids": t[None, :s], **feed})
                times[a, s].append((time.perf_counter() - t0) / len(tokens) * 1e3)
    for a, path in enumerate(args.artifacts):
        nodes = len(onnx.load(f"{path}/trunk.onnx", load_external_data=False).graph.node)
        med = {s: statistics.median(times[a, s]) for s in sizes}
        row = "  ".join(f"S={s} {med[s]:.3f} ms ({med[s] / med[1]:.2f})" for s in sizes)
        print(f"{path} ({engines[a].manifest.get('moe', 'sparse')}, {nodes} nodes): {row}")
    for e in engines:
        e.close()


if __name__ == "__main__":
    main()
