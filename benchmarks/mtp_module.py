"""nextn's MTP-module kernel (runtime/mtp_module.py): an int4 MTP graph as one node, against the graph it replaces.

    python benchmarks/mtp_module.py [--artifact DIR] [--rounds 5] [--prompts 6] [--tokens 128] [--threads 0]

1. Each MTP graph of --artifact (default: the embedded model's int4 drafts, what `nextn run` drafts with) opened as
   the runtime opens it, with the kernel and with its ~72 nodes (the rewrite skipped), alone at the row counts
   decoding calls it with (1 row; 4 catch-up rows with every output or the last), past 100: median of 200 calls per
   round, rounds alternating which goes first; kernel / graph as the median of per-round ratios; max |difference|
   relative to the largest value.
2. Decoding: held-out prompts with K = 0, 3 and auto, runs alternating per prompt between the graph, the kernel
   called once per draft ("calls": the decoder's own loop) and a step's drafts in one kernel call ("chain":
   mtp_module.NativeDrafter, what the runtime uses); TPOT medians, greedy tokens compared, and where a K = 3
   step goes (verify pass, drafting wall time per draft).
"""

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np

from nextn.embedded import embedded_default
from nextn.export import io
from nextn.prompts import stdlib_sequences
from nextn.runtime import mtp_module
from nextn.runtime.api import Model


def without_kernel(artifact: Path, threads: int) -> Model:
    with mock.patch.object(mtp_module, "use_mtp_module", lambda model, array: None):
        return Model(artifact, threads=threads)


def op_alone(kernel: Model, graph: Model, rounds: int) -> None:
    cfg = kernel.engines.manifest["config"]
    h, r, d, v = cfg["hidden_size"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["vocab_size"]
    rng, p = np.random.default_rng(0), 100
    print("1. one MTP call, past 100 (kernel / graph: medians of per-round ratios)")
    for name in [n for n in kernel.engines if n.startswith("mtp_")]:
        for s, rows in ((1, [0]), (4, [0, 1, 2, 3]), (4, [3])):
            feed = io.mtp_feed(rng.integers(0, v, (1, s)), rng.standard_normal((1, s, h), dtype=np.float32),
                               (p + np.arange(s))[None], np.ones((1, p + s), np.int64),
                               rng.standard_normal((1, p, r), dtype=np.float32),
                               rng.standard_normal((1, p, d), dtype=np.float32), np.array([rows]))  # fmt: skip
            a, b = kernel.engines[name].run(feed), graph.engines[name].run(feed)
            diff = max(float(np.abs(x - y).max() / (np.abs(y).max() + 1e-12)) for x, y in zip(a, b))
            ms = {"kernel": [], "graph": []}
            for rnd in range(rounds):
                for label, m in (("kernel", kernel), ("graph", graph))[:: 1 if rnd % 2 == 0 else -1]:
                    e = m.engines[name]
                    t0 = time.perf_counter()
                    for _ in range(200):
                        e.run(feed)
                    ms[label].append((time.perf_counter() - t0) / 200 * 1e3)
            ratio = statistics.median(k / g for k, g in zip(ms["kernel"], ms["graph"]))
            print(f"   {name} rows in {s}, out {len(rows)}: kernel {statistics.median(ms['kernel']) * 1e3:.1f} us, "
                  f"graph {statistics.median(ms['graph']) * 1e3:.1f} us ({ratio:.2f}); max rel. difference {diff:.1e}")


def decoding(kernel: Model, graph: Model, prompts: list, tokens: int, rounds: int) -> None:
    print(f"2. decoding {len(prompts)} held-out prompts x {tokens} tokens, {rounds} rounds (TPOT medians)")
    chain = kernel.decoder.drafter
    forms = {"chain": (kernel, chain), "calls": (kernel, None), "graph": (graph, None)}
    tpot: dict = {}
    outs: dict = {}
    for rnd in range(rounds):
        for p in prompts:
            for k in (0, 3, "auto"):
                for label in list(forms)[:: 1 if rnd % 2 == 0 else -1]:
                    m, drafter = forms[label]
                    m.decoder.drafter = drafter
                    out, st = m.decoder.generate(p, tokens, draft=k)
                    tpot.setdefault((k, label), []).append(st.tpot_ms)
                    outs.setdefault((k, label), []).append(out)
    kernel.decoder.drafter = chain
    for k in (0, 3, "auto"):
        row = ", ".join(f"{label} {statistics.median(tpot[(k, label)]):.3f} ms" for label in forms)
        ratio = statistics.median(a / b for a, b in zip(tpot[(k, "chain")], tpot[(k, "graph")]))
        print(f"   K = {k}: {row} (chain / graph {ratio:.2f})")
    plain = statistics.median(tpot[(0, "graph")] + tpot[(0, "calls")] + tpot[(0, "chain")])  # K = 0: no drafts
    for label in forms:
        print(f"   {label}: K = 3 {plain / statistics.median(tpot[(3, label)]):.2f}x, "
              f"auto {plain / statistics.median(tpot[('auto', label)]):.2f}x over K = 0 (all three forms' K = 0 runs)")
    print("   greedy tokens identical across all nine:", all(outs[key] == outs[(0, "graph")] for key in outs))
    for label, (m, drafter) in forms.items():
        m.decoder.drafter = drafter
        steps = verify = draft = drafts = one = ones = 0.0
        for p in prompts:
            st = m.decoder.generate(p, tokens, draft=3)[1]
            steps, verify = steps + st.steps, verify + st.decode_trunk_ms
            draft, drafts = draft + st.draft_ms, drafts + st.drafted
            st0 = m.decoder.generate(p, tokens, draft=0)[1]
            one, ones = one + st0.decode_trunk_ms, ones + st0.steps
        print(f"   {label}, K = 3: verify pass {verify / steps:.3f} ms, a draft {draft / drafts:.3f} ms "
              f"= {draft / drafts / (one / ones):.2f} of a 1-token pass ({one / ones:.3f} ms; drafts include the "
              "first step's catch-up over the prompt)")
    kernel.decoder.drafter = chain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    artifact = args.artifact or embedded_default()
    kernel, graph = Model(artifact, threads=args.threads), without_kernel(artifact, args.threads)
    if not kernel.engines["mtp_0"].mtp_module:
        raise SystemExit(f"{artifact}: its MTP graphs are not int4 ones, or nextn's kernels could not be built")
    op_alone(kernel, graph, args.rounds)
    prompts = stdlib_sequences(kernel.tokenizer, "heldout", args.prompts, 64)
    decoding(kernel, graph, prompts, args.tokens, max(1, args.rounds // 2))


if __name__ == "__main__":
    main()
