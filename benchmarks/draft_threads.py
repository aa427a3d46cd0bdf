"""Decoding with the trunk and the MTP drafts on different intra-op thread counts, interleaved (BENCHMARKS.md).

    python benchmarks/draft_threads.py [ARTIFACT] [--rounds 6] [--gen-len 128]
    (no artifact: the embedded model as nextn run opens it)

Configurations (trunk threads / draft threads): 1/1, 2/1 (the runtime now: drafts on DRAFT_THREADS = 1) and
2/2 (what every graph got from ONNX Runtime's default before: each session's own 2-thread pool, spinning
beside the other's). Each round runs every configuration at K = 0, 3 and auto on the next held-out prompt
(EOS ignored). Prints median TPOT, each against 1/1, and K = 3 / auto against K = 0 of the same configuration.
"""

import argparse
import statistics

import nextn
from nextn.bench.latency import load_prompts
from nextn.embedded import embedded_default
from nextn.runtime import engines

CONFIGS = {"1/1": (1, 1), "2/1": (2, 1), "2/2": (2, 2)}
KS = (0, 3, "auto")


def load(artifact: str, trunk: int, drafts: int):
    saved = engines.DRAFT_THREADS
    engines.DRAFT_THREADS = drafts  # how the drafts' sessions are opened, for this configuration only
    try:
        m = nextn.load(artifact, threads=trunk)
    finally:
        engines.DRAFT_THREADS = saved
    m.eos_ids = ()
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", nargs="?")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--gen-len", type=int, default=128)
    args = ap.parse_args()
    art = args.artifact or str(embedded_default())
    models = {c: load(art, *t) for c, t in CONFIGS.items()}
    first = models["1/1"]
    prompts = load_prompts(None, first.tokenizer, first.engines.manifest["config"]["vocab_size"], 64, 16)
    for m in models.values():
        m.generate(prompts[0], max_new_tokens=16, draft="auto")  # warm-up and the step-cost calibration
    tpot = {(c, k): [] for c in CONFIGS for k in KS}
    for r in range(args.rounds):
        for c in list(CONFIGS)[:: 1 if r % 2 == 0 else -1]:
            for k in KS:
                s = models[c].generate(prompts[(r + 1) % len(prompts)], max_new_tokens=args.gen_len, draft=k).stats
                tpot[c, k].append(s["tpot_ms"])

    def paired(a, b):
        return statistics.median([x / y for x, y in zip(a, b)])

    for c in CONFIGS:
        cells = [f"K={k}: {statistics.median(tpot[c, k]):.3f} ms ({paired(tpot['1/1', k], tpot[c, k]):.2f}x of 1/1)"
                 for k in KS]  # fmt: skip
        print(f"{c}  " + "  ".join(cells) + f"  K=3 {paired(tpot[c, 0], tpot[c, 3]):.2f}x, "
              f"auto {paired(tpot[c, 0], tpot[c, 'auto']):.2f}x of K=0")
    for m in models.values():
        m.close()


if __name__ == "__main__":
    main()
