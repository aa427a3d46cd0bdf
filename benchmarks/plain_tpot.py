"""Plain greedy TPOT (K = 0) of several artifacts, alternating per prompt in one process (BENCHMARKS.md).

    python benchmarks/plain_tpot.py FP32_ARTIFACT QUANTIZED_ARTIFACT [...] --prompt-len 64 --gen-len 128

Prompts: held-out stdlib files (the artifacts need a tokenizer); EOS ignored; 2 rounds over 5 prompts;
prints each artifact's median TPOT and its ratio to the first artifact's.
"""

import argparse
import statistics

import nextn
from nextn.bench.latency import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=128)
    args = ap.parse_args()
    models = [nextn.load(a, threads=1) for a in args.artifacts]
    for m in models:
        m.eos_ids = ()
    prompts = load_prompts(None, models[0].tokenizer, models[0].engines.manifest["config"]["vocab_size"],
                           args.prompt_len, 5)  # fmt: skip
    tpot = [[] for _ in models]
    for _ in range(2):
        for p in prompts:
            for i, m in enumerate(models):
                tpot[i].append(m.generate(p, max_new_tokens=args.gen_len).stats["tpot_ms"])
    base = statistics.median(tpot[0])
    for a, t in zip(args.artifacts, tpot):
        print(f"{a}: median TPOT {statistics.median(t):.3f} ms ({base / statistics.median(t):.2f}x the first)")


if __name__ == "__main__":
    main()
