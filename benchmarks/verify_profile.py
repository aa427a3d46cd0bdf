"""Where a verify pass's extra time goes: ONNX Runtime's profile of the embedded trunk per op type at 1 and
4 new tokens, opened as the runtime opens it (pre-packing, load forms).

    python benchmarks/verify_profile.py [--threads 1] [--runs 300]

Past of 64 random cache entries; runs alternate in blocks of `--runs` per width, twice, and the first 50
runs of each block are not counted. The profiler adds a fixed cost per node, so compare the two columns,
not their sums with a step's time.
"""

import argparse
import bisect
import collections
import glob
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort

from nextn.embedded import embedded_default
from nextn.export import io
from nextn.runtime.engines import open_engines

WIDTHS, WARM, PAST = (1, 4), 50, 64


def profiled_trunk(threads: int, prefix: str):
    plain = ort.SessionOptions

    def profiling():  # every session the runtime opens here writes a profile
        so = plain()
        so.enable_profiling, so.profile_file_prefix = True, prefix
        return so

    ort.SessionOptions = profiling
    try:
        return open_engines(embedded_default(), threads=threads)
    finally:
        ort.SessionOptions = plain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()
    out_dir = tempfile.mkdtemp()
    engines = profiled_trunk(args.threads, os.path.join(out_dir, "p"))
    cfg, rng = engines.manifest["config"], np.random.default_rng(0)
    pasts = [(rng.standard_normal((1, PAST, cfg["kv_lora_rank"]), dtype=np.float32),
              rng.standard_normal((1, PAST, cfg["qk_rope_head_dim"]), dtype=np.float32))
             for _ in range(cfg["num_hidden_layers"])]  # fmt: skip
    feeds = {s: io.trunk_feed(rng.integers(0, cfg["vocab_size"], (1, s)), (PAST + np.arange(s))[None],
                              np.ones((1, PAST + s), np.int64), pasts) for s in WIDTHS}  # fmt: skip
    session = engines["trunk"].session
    order = []
    for s in WIDTHS * 2:
        for _ in range(args.runs):
            session.run(None, feeds[s])
        order += [s] * args.runs
    events = json.load(open(session.end_profiling()))
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    starts = [r["ts"] for r in runs]
    per_op = {s: collections.Counter() for s in WIDTHS}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and i % args.runs >= WARM:
            per_op[order[i]][e["args"]["op_name"]] += e["dur"]
    counted = 2 * (args.runs - WARM)
    total = {s: np.median([r["dur"] for r, w in zip(runs, order) if w == s]) for s in WIDTHS}
    print(f"model_run median: {total[1]:.0f} us at 1 token, {total[4]:.0f} us at 4 (profiled)")
    print(f"{'op type':34s} {'1 token us':>10s} {'4 tokens us':>11s}  ratio")
    for op in sorted(per_op[4], key=lambda k: -per_op[4][k]):
        a, b = per_op[1][op] / counted, per_op[4][op] / counted
        print(f"{op:34s} {a:10.1f} {b:11.1f}  {b / a if a else float('nan'):5.2f}x")
    for f in glob.glob(os.path.join(out_dir, "*.json")):
        os.remove(f)
    engines.close()


if __name__ == "__main__":
    main()
