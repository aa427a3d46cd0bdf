"""draft="auto" against plain decoding and fixed K, on one or more artifacts, in interleaved rounds.

    python benchmarks/draft_auto.py [ARTIFACT ...] [--rounds 12] [--threads 1] [--gen-len 128] [--draft 1,2,3]
    (no artifact: the embedded model's fp32 export; e.g. add ~/.cache/nextn/artifacts/<name>-int8 after
    `nextn demo --quant int8`)

Each round runs every (artifact, K) once on the next held-out stdlib prompt (EOS ignored), so this VM's
drift hits every row alike; a row's figure is the median over rounds of its TPOT ratio to K = 0 of
the same artifact in the same round, with the range. For auto it also prints the steps chosen per K
and the controller's predicted gain.
"""

import argparse
import statistics

import nextn
from nextn.bench.latency import load_prompts
from nextn.embedded import embedded_artifact


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--draft", default="1,2,3")
    args = ap.parse_args()
    arts = args.artifacts or [str(embedded_artifact())]
    ks = [0, *[int(k) for k in args.draft.split(",")], "auto"]
    models = [nextn.load(a, threads=args.threads) for a in arts]
    prompts = load_prompts(None, models[0].tokenizer, models[0].engines.manifest["config"]["vocab_size"], 64, 16)
    for m in models:
        m.eos_ids = ()
        m.generate(prompts[0], max_new_tokens=16, draft="auto")  # warm-up (and the step-cost calibration)
    tpot = {(a, k): [] for a in range(len(arts)) for k in ks}
    hist: dict = {a: {} for a in range(len(arts))}
    gain = {a: [] for a in range(len(arts))}
    for r in range(args.rounds):
        for a, m in enumerate(models):
            for k in ks:
                s = m.generate(prompts[(r + 1) % len(prompts)], max_new_tokens=args.gen_len, draft=k).stats
                tpot[a, k].append(s["tpot_ms"])
                if k == "auto":
                    for kk, n in s["draft_histogram"].items():
                        hist[a][kk] = hist[a].get(kk, 0) + n
                    gain[a].append(s.get("predicted_gain") or 1.0)
    for a, art in enumerate(arts):
        print(art)
        for k in ks:
            ratios = [p / x for p, x in zip(tpot[a, 0], tpot[a, k])]
            line = (f"  K={k:<4} TPOT {statistics.median(tpot[a, k]):.3f} ms  vs K=0 {statistics.median(ratios):.2f}x "
                    f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
            if k == "auto":
                line += f"  steps per K {dict(sorted(hist[a].items()))}, predicted {statistics.median(gain[a]):.2f}x"
            print(line)
    for m in models:
        m.close()


if __name__ == "__main__":
    main()
