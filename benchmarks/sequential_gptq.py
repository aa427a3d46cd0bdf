"""Time and peak memory of sequential GPTQ alone (what `nextn calibrate --weight-method gptq` runs before
its rewrite), straight from a checkpoint, no artifact needed (BENCHMARKS.md, "Real checkpoint sizes").

    /usr/bin/time -v python benchmarks/sequential_gptq.py CHECKPOINT SCRATCH [--samples 32 --seq-len 256]

Random token ids stand in for calibration data (memory and time do not depend on them); the trunk and every
MTP module are quantized int4 (block 64, 8-bit head), the fused-MoE, absorbed, opset-23 forms `nextn export`
writes by default. Prints the time and peak RSS after each layer and MTP module.
"""

import argparse
import resource
import time
from pathlib import Path

import numpy as np

from nextn.calib import sequential
from nextn.calib.calibrate import BLOCK_SIZES
from nextn.model.config import read_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("scratch", type=Path, help="where the quantized weights are spilled")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    cfg = read_config(args.checkpoint)
    graphs = {"trunk": {}, **{f"mtp_{k}": {} for k in range(cfg.num_nextn_predict_layers)}}
    manifest = {"graphs": graphs, "attention": "absorbed", "moe": "fused", "opset": 23}
    rng = np.random.default_rng(0)
    sequences = [list(map(int, rng.integers(2, cfg.vocab_size, args.seq_len))) for _ in range(args.samples)]
    t0, done = time.perf_counter(), [0]

    def tick():
        done[0] += 1
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"part {done[0]}: {time.perf_counter() - t0:.0f} s, peak RSS {peak:.2f} GB", flush=True)

    q = sequential.sequential_pass(args.checkpoint, manifest, {g: "int4" for g in graphs}, sequences,
                                   sequential.PassSettings(64, 8, BLOCK_SIZES), args.scratch, tick)  # fmt: skip
    print(f"{sum(len(f) for f in q.files.values())} weights in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
