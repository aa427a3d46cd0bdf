"""Peak RSS and time of loading a ~1 GB DeepSeek-V3 checkpoint into the reference model.

    python benchmarks/checkpoint_load.py [--dir /tmp/nextn-1gb]

Writes the `1gb` preset (deepseek_like(1024, 12) + 1 MTP module) as fp32, bf16 and fp8 checkpoints,
then loads each in a fresh process, touches every weight (so lazily mapped pages count), and reports
peak RSS against the bytes of the loaded weights, with the RSS of a bare `import torch` process as
the baseline measured in the same run.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch

def hwm():  # peak RSS of this process image (VmHWM; ru_maxrss would inherit the parent's peak)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base = hwm()
if sys.argv[1] == "baseline":
    print(json.dumps({"peak": base, "base": base})); sys.exit()
from nextn.model.weights import load_model
t0 = time.perf_counter()
model, cfg = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
t1 = time.perf_counter()
params = {p.data_ptr(): p for p in model.parameters()}.values()
checksum = sum(float(p.sum()) for p in params)  # reads every page
nbytes = sum(p.numel() * p.element_size() for p in params)
print(json.dumps({"peak": hwm(), "base": base,
                  "load_s": t1 - t0, "weight_bytes": nbytes}))
"""


def run(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/nextn-1gb")
    args = ap.parse_args()
    from nextn.testing import PRESETS, write_random_checkpoint

    root = Path(args.dir)
    cases = [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"), ("fp8", "bfloat16"),
             ("fp8", "float32")]  # fmt: skip
    for stored in {s for s, _ in cases}:
        if not (root / stored / "config.json").is_file():
            write_random_checkpoint(root / stored, PRESETS["1gb"](), weights=stored, shard_bytes=400 * 2**20)
    base = run("baseline")["peak"]
    print(f"baseline (python + import torch): peak RSS {base / 2**20:.0f} MiB")
    print(f"{'stored':>9} -> {'loaded':<9} {'weights':>9} {'peak RSS':>9} {'over base':>10} {'ratio':>6} {'load s':>7}")
    for stored, dtype in cases:
        r = run(str(root / stored), dtype)
        over = r["peak"] - base
        print(f"{stored:>9} -> {dtype:<9} {r['weight_bytes'] / 2**20:>7.0f}Mi {r['peak'] / 2**20:>7.0f}Mi "
              f"{over / 2**20:>8.0f}Mi {over / r['weight_bytes']:>6.2f} {r['load_s']:>7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
