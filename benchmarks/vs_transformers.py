"""Plain decoding, nextn (ONNX Runtime, K = 0) against transformers' eager greedy `generate`, same checkpoint.

    python benchmarks/vs_transformers.py CHECKPOINT ARTIFACT [--new 64] [--threads 1]

ARTIFACT is `nextn export CHECKPOINT`. Both run greedy with EOS off from a 32-token prompt on the same
number of threads; medians of 3 runs after a warm-up, measured in the same process. Prints ms per token
of each, their ratio, and whether the tokens agree.
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
    h = [run_hf() for _ in range(3)]
    n = [run_nextn() for _ in range(3)]
    hm, nm = statistics.median(x[0] for x in h), statistics.median(x[0] for x in n)
    print(f"transformers eager generate: {hm:.3f} ms/token")
    print(f"nextn ORT (K=0):             {nm:.3f} ms/token   ratio {hm / nm:.2f}x   same tokens: {h[0][1] == n[0][1]}")


if __name__ == "__main__":
    main()
