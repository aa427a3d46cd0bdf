"""One trunk step of two artifacts of the same checkpoint (an export change's before and after), interleaved.

    python benchmarks/trunk_step_ab.py ARTIFACT_A ARTIFACT_B [--rounds 9] [--iters 40] [--threads 1] [--past 100]

At 1, 2 and 4 new tokens after a random past of --past tokens (batch 1), each trunk pass preceded by one MTP call as in
a draft-and-verify step (so the trunk's weights are as cold in the CPU caches as in decoding); per round the
median of `iters` passes, A and B alternating first. Prints the medians and B / A as the median of per-round
ratios, and each artifact's 4-token / 1-token cost (the verify ratio).
"""

import argparse
import statistics
import time

import numpy as np

from nextn.export import io
from nextn.runtime.engines import open_engines

WIDTHS = (1, 2, 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--past", type=int, default=100)
    args = ap.parse_args()
    past_len = args.past
    engines = [open_engines(a, threads=args.threads) for a in args.artifacts]
    cfg = engines[0].manifest["config"]
    rng = np.random.default_rng(0)
    pasts = [(rng.standard_normal((1, past_len, cfg["kv_lora_rank"]), dtype=np.float32),
              rng.standard_normal((1, past_len, cfg["qk_rope_head_dim"]), dtype=np.float32))
             for _ in range(cfg["num_hidden_layers"])]  # fmt: skip
    ms = {(i, s): [] for i in range(2) for s in WIDTHS}
    for r in range(args.rounds):
        for s in WIDTHS:
            ids = rng.integers(0, cfg["vocab_size"], (1, s))
            pos, mask = np.arange(past_len, past_len + s)[None], np.ones((1, past_len + s), np.int64)
            trunk = io.trunk_feed(ids, pos, mask, pasts)
            hidden = rng.standard_normal((1, 1, cfg["hidden_size"]), dtype=np.float32)
            mtp = io.mtp_feed(ids[:, :1], hidden, pos[:, :1], mask[:, : past_len + 1], *pasts[0])
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                times = []
                for _ in range(args.iters):
                    engines[i]["mtp_0"].run(mtp)
                    t0 = time.perf_counter()
                    engines[i]["trunk"].run(trunk)
                    times.append(time.perf_counter() - t0)
                ms[i, s].append(statistics.median(times) * 1e3)
    for s in WIDTHS:
        ratio = statistics.median([b / a for a, b in zip(ms[0, s], ms[1, s])])
        print(f"{s} new token(s): A {statistics.median(ms[0, s]):.3f} ms  B {statistics.median(ms[1, s]):.3f} ms  "
              f"B / A {ratio:.3f}")
    for i, art in enumerate(args.artifacts):
        print(f"{art}: 4-token / 1-token {statistics.median(ms[i, 4]) / statistics.median(ms[i, 1]):.3f}")
    for e in engines:
        e.close()


if __name__ == "__main__":
    main()
