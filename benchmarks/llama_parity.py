"""Plain decoding on the 1 GB DeepSeek-V3 checkpoint against the memory floor, at every precision (issue 14).

    python benchmarks/llama_parity.py [--root /tmp/nextn-parity] [--rounds 7] [--threads 1,2]
                                      [--variants fp32,int8,int4-b32,int4,int4-b128,int4-b128-h4] [--llama-cpp]

Builds once under --root (reused by later runs): the `1gb` preset of `python -m nextn.testing` (hidden 1024,
12 layers, 16 experts top-4, one MTP module: the checkpoint of issue 14's table), its fp32 export, and
quantized artifacts (`nextn calibrate`, round-to-nearest, random calibration ids):

    fp32            the export
    int8            --scheme int8
    int4-b32        --scheme int4 --block-size 32 (nextn 0.2's default)
    int4            --scheme int4 (defaults: blocks of 64, 8-bit head)
    int4-b128       --scheme int4 --block-size 128
    int4-b128-h4    --scheme int4 --block-size 128 --head-bits 4

Then, in rounds (each round runs every (variant, threads) once, starting one later than the round before):
plain greedy decoding (K = 0) of 64 tokens after a 64-token prompt (llama-bench's `-d 64 -n 64`), TPOT from
the runtime's stats, and the machine's read bandwidth at 1 and 2 threads measured inside the same round.
Prints per row: median TPOT, weight bytes a token reads (nextn/bench/floor.py), the floor (bytes / read
bandwidth of that round), TPOT / floor (median of per-round ratios), and the achieved GB/s.

With --llama-cpp, llama.cpp is built from llama-cpp-python's pinned sdist (benchmarks/llamacpp_build.py: commit
0c1e570, issue 14's), the checkpoint converted to f32, q8_0 and q4_0 GGUFs, and each round also runs
`llama-bench -d 64 -n 64` at every thread count for the format of each nextn variant (fp32 - f32, int8 - q8_0,
int4* - q4_0): the table then gives nextn / llama.cpp as the median of per-round ratios, measured in the same
rounds. Without it, issue 14's table is printed beside (another run: compare TPOT / floor, not milliseconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

VARIANTS = {
    "fp32": None,
    "int8": dict(scheme="int8"),
    "int4-b32": dict(scheme="int4", block_size=32),
    "int4": dict(scheme="int4"),
    "int4-b128": dict(scheme="int4", block_size=128),
    "int4-b128-h4": dict(scheme="int4", block_size=128, head_bits=4),
}
# issue 14's table: llama.cpp 0c1e570 `llama-bench -d 64 -n 64`, ms/token, and the bytes one token reads;
# the read bandwidth of that machine, 35 GB/s at one thread (numpy max over 1 GiB), gives its floor
LLAMA_CPP = {"fp32": (16.2, 12.4, 476.5e6), "int8": (8.2, 6.3, 127e6), "int4": (5.9, 4.7, 76e6)}
LLAMA_CPP_READ_GBS = 35.0


def build(root: Path, names: list[str]) -> dict[str, Path]:
    from nextn.calib.calibrate import CalibOptions, calibrate_artifact
    from nextn.export.exporter import ExportOptions, export_checkpoint
    from nextn.testing import PRESETS, write_random_checkpoint

    ckpt, fp32 = root / "ckpt", root / "fp32"
    if not (ckpt / "config.json").is_file():
        print("writing the 1gb checkpoint ...", flush=True)
        write_random_checkpoint(ckpt, PRESETS["1gb"](), seed=0)
    if not (fp32 / "manifest.json").is_file():
        print("exporting fp32 ...", flush=True)
        export_checkpoint(ckpt, fp32, ExportOptions())
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    ids = root / "calib.ids"
    rng = np.random.default_rng(0)
    ids.write_text("\n".join(" ".join(map(str, rng.integers(2, vocab, 64))) for _ in range(6)))
    out = {}
    for name in names:
        if VARIANTS[name] is None:
            out[name] = fp32
            continue
        out[name] = root / name
        if not (out[name] / "manifest.json").is_file():
            print(f"calibrating {name} ...", flush=True)
            opts = CalibOptions(**VARIANTS[name], weight_method="rtn", samples=4, seq_len=64, eval_samples=1,
                                min_top1=0.0, decode_report=False)  # fmt: skip
            calibrate_artifact(fp32, out[name], [ids], [], opts)
    return out


def llama_format(variant: str) -> str:
    """The llama.cpp format a nextn variant is compared with."""
    return {"fp32": "f32", "int8": "q8_0"}.get(variant, "q4_0")


def measure(artifacts: dict[str, Path], threads: list[int], rounds: int, depth: int, gen: int, llama=None) -> dict:
    """`llama`: (LlamaCpp, its GGUFs by format) to run beside, or None."""
    import nextn
    from nextn.bench.floor import read_bandwidth, trunk_read_bytes

    rows = [(name, t) for name in artifacts for t in threads]
    llama_rows = sorted({(llama_format(name), t) for name, t in rows}) if llama else []
    llama_ms = {r: [] for r in llama_rows}
    models = {(name, t): nextn.load(artifacts[name], threads=t) for name, t in rows}
    reads = {name: trunk_read_bytes(path).total for name, path in artifacts.items()}
    vocab = models[rows[0]].engines.manifest["config"]["vocab_size"]
    prompt = [int(x) for x in np.random.default_rng(1).integers(2, vocab, depth)]
    for m in models.values():
        m.eos_ids = ()
        m.generate(prompt, max_new_tokens=8, draft=0)  # warm-up: pages in, kernels chosen
    tpot = {r: [] for r in rows}
    vs_floor = {r: [] for r in rows}
    bw = {t: [] for t in threads}
    for i in range(rounds):
        rate = {t: read_bandwidth(t) for t in threads}
        for t in threads:
            bw[t].append(rate[t])
        every = rows + llama_rows
        for r in every[i % len(every):] + every[: i % len(every)]:
            if r in llama_ms:
                llama_ms[r].append(llama[0].tpot_ms(llama[1][r[0]], r[1], depth, gen))
                continue
            ms = models[r].generate(prompt, max_new_tokens=gen, draft=0).stats["tpot_ms"]
            tpot[r].append(ms)
            vs_floor[r].append(ms / (reads[r[0]] / rate[r[1]] * 1e3))
        print(f"round {i + 1}/{rounds}: read bandwidth " +
              ", ".join(f"{rate[t] / 1e9:.1f} GB/s at {t} thread(s)" for t in threads), flush=True)  # fmt: skip
    for m in models.values():
        m.close()
    doc = {
        "read_gbs": {t: statistics.median(bw[t]) / 1e9 for t in threads},
        "rows": [{"variant": name, "threads": t, "tpot_ms": statistics.median(tpot[(name, t)]),
                  "read_mb": reads[name] / 1e6, "tpot_over_floor": statistics.median(vs_floor[(name, t)]),
                  "tpot_over_floor_range": [min(vs_floor[(name, t)]), max(vs_floor[(name, t)])]}
                 for name, t in rows],
    }  # fmt: skip
    if llama:
        doc["llama_cpp"] = {f"{f}/{t}": statistics.median(llama_ms[(f, t)]) for f, t in llama_rows}
        for row in doc["rows"]:
            theirs = llama_ms[(llama_format(row["variant"]), row["threads"])]
            ratios = [a / b for a, b in zip(tpot[(row["variant"], row["threads"])], theirs)]
            row["llama_cpp_tpot_ms"] = statistics.median(theirs)
            row["vs_llama_cpp"] = statistics.median(ratios)
            row["vs_llama_cpp_range"] = [min(ratios), max(ratios)]
    return doc


def print_table(doc: dict) -> None:
    if "llama_cpp" in doc:
        print("\n| variant | threads | TPOT ms | MB read / token | TPOT / floor | llama.cpp format, TPOT ms "
              "| nextn / llama.cpp, per round (range) |")
        print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
        for r in doc["rows"]:
            lo, hi = r["vs_llama_cpp_range"]
            print(f"| {r['variant']} | {r['threads']} | {r['tpot_ms']:.2f} | {r['read_mb']:.1f} | "
                  f"{r['tpot_over_floor']:.2f} | {llama_format(r['variant'])} {r['llama_cpp_tpot_ms']:.2f} | "
                  f"{r['vs_llama_cpp']:.2f} ({lo:.2f}-{hi:.2f}) |")
    else:
        _print_issue_table(doc)
    print("\nread bandwidth (median of rounds): " + ", ".join(f"{v:.1f} GB/s at {t} thread(s)"
                                                            for t, v in doc["read_gbs"].items()))  # fmt: skip


def _print_issue_table(doc: dict) -> None:
    """nextn's rows beside issue 14's llama.cpp figures (another run)."""
    print("\n| variant | threads | TPOT ms | MB read / token | achieved GB/s | TPOT / floor (range) "
          "| llama.cpp (issue 14) TPOT / floor |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in doc["rows"]:
        ref = LLAMA_CPP.get(r["variant"].split("-")[0])
        llama = "-"
        if ref and r["threads"] == 1:
            floor_ms = ref[2] / (LLAMA_CPP_READ_GBS * 1e9) * 1e3
            llama = f"{ref[0]:.1f} ms / {floor_ms:.2f} = {ref[0] / floor_ms:.2f}"
        elif ref and r["threads"] == 2:
            llama = f"{ref[1]:.1f} ms"
        lo, hi = r["tpot_over_floor_range"]
        print(f"| {r['variant']} | {r['threads']} | {r['tpot_ms']:.2f} | {r['read_mb']:.1f} | "
              f"{r['read_mb'] / r['tpot_ms']:.1f} | {r['tpot_over_floor']:.2f} ({lo:.2f}-{hi:.2f}) | {llama} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/nextn-parity"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--depth", type=int, default=64)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--llama-cpp", action="store_true", help="build llama.cpp here and measure it in the same rounds")
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants {','.join(unknown)}: choose from {', '.join(VARIANTS)}")
    artifacts = build(args.root, names)
    llama = None
    if args.llama_cpp:
        from llamacpp_build import LlamaCpp, gguf_read_mb

        tool = LlamaCpp.build(args.root / "llama.cpp")
        ggufs = tool.ggufs(args.root / "ckpt", args.root / "llama.cpp")
        llama = (tool, ggufs)
        cfg = json.loads((args.root / "ckpt" / "config.json").read_text())
        for f, path in ggufs.items():
            mb = gguf_read_mb(path, tool.source, cfg["num_experts_per_tok"], cfg["n_routed_experts"])
            print(f"llama.cpp {f}: {mb:.1f} MB read per token", flush=True)
    doc = measure(artifacts, [int(t) for t in args.threads.split(",")], args.rounds, args.depth, args.gen, llama)
    print_table(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
