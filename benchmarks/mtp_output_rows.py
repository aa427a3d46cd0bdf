"""The last MTP module's catch-up with its last row's output only (the decoder's) against every row's.

    python benchmarks/mtp_output_rows.py [--rounds 8]

1. mtp_1 of the embedded model (int4 drafts) alone, warm, past 80: 1, 3 and 5 rows, output_rows all / last.
2. Decoding, 6 held-out prompts x 96 tokens at K = 0 and 3: the decoder as shipped ("last") against one
   whose last module outputs every row ("all"), alternated per round in one process; greedy tokens must match.
"""

import argparse
import statistics
import time

import numpy as np

import nextn
from nextn.embedded import embedded_default
from nextn.export import io
from nextn.prompts import stdlib_sequences
from nextn.runtime import decoder as decoder_module

SHIPPED = decoder_module.Decoder._mtp


def every_row(self, st, module, start, tokens, hidden, stats):
    """Decoder._mtp asking every module for every row (before output_rows was used)."""
    s = len(tokens)
    feed = io.mtp_feed(np.asarray([tokens], np.int64), hidden[None].astype(self.np, copy=False),
                       (np.arange(start, start + s, dtype=np.int64) + module + 1)[None], np.ones((1, start + s), np.int64),
                       st.mtp_c[module][:, :start], st.mtp_k[module][:, :start], np.arange(s, dtype=np.int64)[None])  # fmt: skip
    c, k = io.new()
    into = {c: st.mtp_c[module][:, start : start + s], k: st.mtp_k[module][:, start : start + s],
            io.HIDDEN_OUT: st.mtp_hidden[module][None, start : start + s]}  # fmt: skip
    out = self._run(f"mtp_{module}", feed, stats, into)
    return out[io.LOGITS_AT][0], out[io.HIDDEN_AT][0]


def alone(model, rounds: int) -> None:
    engine, cfg = model.engines["mtp_1"], model.engines.manifest["config"]
    rng, past = np.random.default_rng(0), 80
    pc = rng.standard_normal((1, past, cfg["kv_lora_rank"]), dtype=np.float32)
    pk = rng.standard_normal((1, past, cfg["qk_rope_head_dim"]), dtype=np.float32)
    for s in (1, 3, 5):
        args = (rng.integers(0, cfg["vocab_size"], (1, s)), rng.standard_normal((1, s, cfg["hidden_size"]), dtype=np.float32),
                np.arange(past, past + s)[None], np.ones((1, past + s), np.int64), pc, pk)  # fmt: skip
        feeds = {"all": io.mtp_feed(*args, np.arange(s)[None]), "last": io.mtp_feed(*args, np.array([[s - 1]]))}
        us: dict = {}
        for _ in range(rounds):
            for arm, feed in feeds.items():
                times = []
                for _ in range(300):
                    t = time.perf_counter()
                    engine.run(feed)
                    times.append(time.perf_counter() - t)
                us.setdefault(arm, []).append(statistics.median(times) * 1e6)
        print(f"mtp_1 alone, {s} rows: all {statistics.median(us['all']):.1f} us, last {statistics.median(us['last']):.1f} us")


def decoding(model, rounds: int) -> None:
    prompts = stdlib_sequences(model.tokenizer, "heldout", 6, 48)
    res: dict = {}
    tokens: dict = {}
    try:
        for r in range(rounds):
            for arm in ("last", "all") if r % 2 == 0 else ("all", "last"):
                decoder_module.Decoder._mtp = SHIPPED if arm == "last" else every_row
                for draft in (0, 3):
                    stats = [model.generate(p, max_new_tokens=96, draft=draft) for p in prompts]
                    tokens[arm, draft] = [o.token_ids for o in stats]
                    tpot = statistics.median(o.stats["tpot_ms"] for o in stats)
                    mtp = statistics.median(o.stats["time_ms"]["mtp"] / max(1, o.stats["steps"]) for o in stats)
                    res.setdefault((arm, draft), []).append((tpot, mtp))
    finally:
        decoder_module.Decoder._mtp = SHIPPED
    assert tokens["last", 3] == tokens["all", 3] == tokens["last", 0], "greedy outputs differ"
    pairs = list(zip(res["all", 3], res["last", 3]))
    print("K = 3 MTP ms a step, all -> last, per round:", ", ".join(f"{a[1]:.2f}->{b[1]:.2f}" for a, b in pairs))
    ratio = [a[0] / b[0] for a, b in pairs]
    print(f"K = 3 TPOT all / last: median {statistics.median(ratio):.3f} (per round {min(ratio):.2f}-{max(ratio):.2f})")
    for arm in ("all", "last"):
        sp = [k0[0] / k3[0] for k0, k3 in zip(res[arm, 0], res[arm, 3])]
        print(f"K = 3 over K = 0 ({arm}): median {statistics.median(sp):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    with nextn.load(embedded_default()) as model:
        alone(model, 6)
        decoding(model, args.rounds)


if __name__ == "__main__":
    main()
