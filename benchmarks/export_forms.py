"""Which MLA form the exported graphs should use, and whether they should return the whole cache.

    python benchmarks/export_forms.py [CHECKPOINT] [--past 128,1024] [--threads 1,2]

Exports the trunk three ways (naive MLA, absorbed MLA, absorbed MLA returning the whole present cache
instead of only the new entries) and times one decode step (batch 1, one new token) in ONNX Runtime at
each past length, medians over repeated runs, all in the same process. Without CHECKPOINT it writes
the `small` preset of nextn.testing.
"""

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nextn.export.graphs import BATCH, TOTAL, TrunkGraph, dynamic_shapes, example_inputs, trunk_io
from nextn.export.validate import make_session
from nextn.export.writer import export_graph
from nextn.model.weights import load_model


class PresentTrunk(TrunkGraph):
    """The alternative interface: return past + new (the whole present cache) per layer."""

    def forward(self, input_ids, position_ids, attention_mask, past):
        out = super().forward(input_ids, position_ids, attention_mask, past)
        new = out[2:]
        present = [torch.cat([p, n], dim=1) for p, n in zip(past, new)]
        return (out[0], out[1], *present)


def time_decode(session, cfg, past_len: int, runs: int) -> float:
    b = 1
    feed = {
        "input_ids": np.array([[5]], np.int64),
        "position_ids": np.array([[past_len]], np.int64),
        "attention_mask": np.ones((b, past_len + 1), np.int64),
    }
    for i in range(cfg.num_hidden_layers):
        feed[f"past.{i}.c_kv"] = np.random.randn(b, past_len, cfg.kv_lora_rank).astype(np.float32)
        feed[f"past.{i}.k_pe"] = np.random.randn(b, past_len, cfg.qk_rope_head_dim).astype(np.float32)
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--past", default="128,1024")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    ckpt = args.checkpoint
    if ckpt is None:
        from nextn.testing import PRESETS, write_random_checkpoint

        ckpt = write_random_checkpoint(tmp / "ckpt", PRESETS["small"]())
    paths = {}
    for name, absorbed, cls in [("naive", False, TrunkGraph), ("absorbed", True, TrunkGraph),
                                ("absorbed+present", True, PresentTrunk)]:  # fmt: skip
        model, cfg = load_model(ckpt, absorbed=absorbed, mtp_layers=0)
        inputs, outputs = trunk_io(cfg, "float32")
        if cls is PresentTrunk:  # its cache outputs span past + new
            outputs = outputs[:2] + [dataclasses.replace(o, shape=(BATCH, TOTAL, o.shape[2])) for o in outputs[2:]]
        path = tmp / f"{name.replace('+', '_')}.onnx"
        export_graph(cls(model), example_inputs(cfg, torch.float32, "trunk", 2, 3, 4),
                     dynamic_shapes("trunk", cfg.num_hidden_layers), inputs, outputs, path, 23)  # fmt: skip
        paths[name] = path
    print(f"checkpoint {ckpt}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"kv_lora {cfg.kv_lora_rank}, heads {cfg.num_attention_heads}; decode step, batch 1, ms (median of {args.runs})")  # fmt: skip
    print(f"{'threads':>7} {'past':>6} " + " ".join(f"{n:>17}" for n in paths) + "  absorbed/naive  present/new")
    for threads in [int(t) for t in args.threads.split(",")]:
        sessions = {n: make_session(p, threads=threads) for n, p in paths.items()}
        for past in [int(p) for p in args.past.split(",")]:
            ms = {n: time_decode(s, cfg, past, args.runs) for n, s in sessions.items()}
            print(f"{threads:>7} {past:>6} " + " ".join(f"{v:>17.3f}" for v in ms.values())
                  + f"  {ms['absorbed'] / ms['naive']:>14.2f}  {ms['absorbed+present'] / ms['absorbed']:>11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
