"""Plain decoding, nextn (ONNX Runtime, K = 0) against transformers' eager greedy `generate`, same checkpoint.

    python benchmarks/vs_transformers.py CHECKPOINT ARTIFACT [--new 64] [--threads 1]

ARTIFACT is `nextn export CHECKPOINT`. Both run greedy with EOS off from a 32-token prompt on the same
number of threads, in the same process, alternating run by run (`--rounds` of one each after a warm-up)
so that machine noise lands on both. Prints the median ms per token of each, the median of the per-round
ratios with its range, and whether the tokens agree.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import nextn

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from hf_reference import load_hf  # noqa: E402  (transformers with the MTP layers ignored)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("artifact")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf, _ = load_hf(Path(args.checkpoint))
    ids = torch.tensor([list(range(2, 34))])

    def run_hf():
        t = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)  # fmt: skip
        return (time.perf_counter() - t) * 1e3 / args.new, out[0, ids.shape[1] :].tolist()

    model = nextn.load(args.artifact, threads=args.threads)
    model.eos_ids = ()

    def run_nextn():
        r = model.generate(ids[0].tolist(), max_new_tokens=args.new)
        return r.stats["time_ms"]["total"] / args.new, r.token_ids

    run_hf(), run_nextn()
    h, n = [], []
    for _ in range(args.rounds):
        h.append(run_hf())
        n.append(run_nextn())
    ratios = sorted(a[0] / b[0] for a, b in zip(h, n))
    hm, nm = statistics.median(x[0] for x in h), statistics.median(x[0] for x in n)
    print(f"transformers eager generate: {hm:.3f} ms/token")
    print(f"nextn ORT (K=0):             {nm:.3f} ms/token   same tokens: {h[0][1] == n[0][1]}")
    print(f"ratio per round: median {statistics.median(ratios):.2f}x (min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x, "
          f"{len(ratios)} rounds)")


if __name__ == "__main__":
    main()
