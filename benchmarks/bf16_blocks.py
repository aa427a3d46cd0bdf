"""The bf16 products' column blocks (runtime/bf16_matmul.py's BLOCK) at two widths, on the same artifact's trunk.

    python benchmarks/bf16_blocks.py [--artifact DIR] [--blocks 128,96] [--reps 400] [--widths 1,2,3,4,5,64]

The artifact (default: the embedded model as `nextn run` opens it) is opened twice, its Bf16MatMul weights laid out
in blocks of each width; one held-out prompt's first 40 tokens fill the caches, then trunk passes of each width
run on both, alternating which goes first, rep by rep. Prints the medians and second / first per width. The logits
are checked equal: each output is a sum over K in order whatever the blocks.
"""

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np

from nextn.embedded import embedded_default
from nextn.prompts import stdlib_sequences
from nextn.runtime import bf16_matmul
from nextn.runtime.api import Model
from nextn.runtime.decoder import _State
from nextn.runtime.sampling import AcceptRule

PAST = 40  # tokens in the caches before each timed pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=None)
    ap.add_argument("--blocks", default="128,96")
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--widths", default="1,2,3,4,5,64")
    args = ap.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    artifact = args.artifact or embedded_default()
    models = []
    for block in blocks:
        with mock.patch.object(bf16_matmul, "BLOCK", block):
            models.append(Model(artifact))
    if not models[0].engines["trunk"].bf16_matmuls:
        raise SystemExit(f"{artifact}: no product of bf16 weights runs on nextn's kernel here")
    prompt = stdlib_sequences(models[0].tokenizer, "heldout", 1, PAST + max(widths))[0]
    runs = []
    for m in models:
        st = _State(m.decoder, PAST + max(widths) + 1)
        stats = m.decoder.new_stats(len(prompt), 0, AcceptRule())
        m.decoder.trunk_rows([st], [prompt[:PAST]], [stats])
        runs.append((m.decoder, st, stats))
    times: dict[tuple[int, int], list[float]] = {}
    for rep in range(args.reps):
        for w in widths:
            logits = []
            for i in (0, 1) if rep % 2 else (1, 0):
                dec, st, stats = runs[i]
                st.n = PAST
                t = time.perf_counter()
                logits.append(dec.trunk_rows([st], [prompt[PAST : PAST + w]], [stats])[0])
                times.setdefault((i, w), []).append(time.perf_counter() - t)
            assert np.array_equal(*logits), w
    print(f"trunk pass of {artifact.name}, blocks of {blocks[0]} and {blocks[1]} (medians of {args.reps})")
    for w in widths:
        a, b = (statistics.median(times[i, w]) * 1e3 for i in (0, 1))
        print(f"  {w:3d} tokens: {a:7.3f} ms  {b:7.3f} ms  {blocks[1]} / {blocks[0]}: {b / a:.3f}")
    for m in models:
        m.close()


if __name__ == "__main__":
    main()
