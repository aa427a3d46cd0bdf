"""nextn's latent-attention kernel (runtime/latent_attention.py) against the MlaAttention function it replaces.

    python benchmarks/latent_attention.py [--artifact DIR] [--rounds 9] [--threads 1] [--past 100]

1. The op alone, one node, at the embedded model's and issue 14's 1 GB checkpoint's shapes, 1, 2 and 4 query
   tokens: the kernel against ONNX Runtime running the function's body (inlined), past of --past.
2. The trunk of --artifact (default: the embedded model's export) opened as the runtime opens it, with the
   kernel and with the function (the rewrite skipped), at 1, 2 and 4 new tokens; per round the median of 40
   passes each, alternating which goes first; kernel / function as the median of per-round ratios.
"""

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nextn.export import io
from nextn.export.latent_attention import INPUTS, function_body
from nextn.runtime import latent_attention, native
from nextn.runtime.engines import open_engines

SHAPES = {"embedded": (4, 32, 16, 32, 64), "1gb": (16, 64, 32, 64, 256)}  # nh, dn, D, dv, R


def paired(fns: dict, rounds: int, iters: int) -> dict:
    """Median ms per call of each fn, rounds interleaved (order alternating), and per-round ratios to the first."""
    ms = {n: [] for n in fns}
    for r in range(rounds):
        for n in list(fns)[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            for i in range(iters):
                fns[n](i)
            ms[n].append((time.perf_counter() - t0) / iters * 1e3)
    first = next(iter(fns))
    return {n: (statistics.median(v), statistics.median([b / a for a, b in zip(ms[first], v)])) for n, v in ms.items()}


def op_alone(rounds: int, threads: int, past: int) -> None:
    print(f"1. the op alone ({threads} thread(s), past {past}): kernel / function")
    rng = np.random.default_rng(0)
    for name, (nh, dn, d, dv, r) in SHAPES.items():
        w = (rng.standard_normal((nh * (dn + dv), r)) * 0.1).astype(np.float32)
        attrs = dict(num_heads=nh, nope_dim=dn, rope_dim=d, v_dim=dv, latent_dim=r, scale=0.1)
        ins = [helper.make_tensor_value_info(n, TensorProto.BOOL if n == "mask" else TensorProto.FLOAT, None)
               for n in INPUTS[:-1]]  # fmt: skip
        graph = helper.make_graph([helper.make_node("MlaAttention", list(INPUTS), ["y"], domain="nextn", **attrs)],
                                  "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(w, "kv_b_proj")])  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("nextn", 1)])
        model.functions.append(function_body(**attrs, opset=23))
        sessions = {}
        for form in ("function", "kernel"):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            if form == "kernel":
                stacks = latent_attention.use_latent_attention(model, {"kv_b_proj": w}.__getitem__)
                model.graph.initializer[0].CopyFrom(numpy_helper.from_array(stacks["kv_b_proj"], "kv_b_proj"))
                so.register_custom_ops_library(str(native.kernel_library()))
            sessions[form] = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for s in (1, 2, 4):
            feed = {"q": rng.standard_normal((1, s, nh * (dn + d)), dtype=np.float32),
                    "cos": rng.standard_normal((1, s, d // 2), dtype=np.float32),
                    "sin": rng.standard_normal((1, s, d // 2), dtype=np.float32),
                    "mask": np.ones((1, s, past + s), bool),
                    "past_c": rng.standard_normal((1, past, r), dtype=np.float32),
                    "past_k": rng.standard_normal((1, past, d), dtype=np.float32),
                    "new_c": rng.standard_normal((1, s, r), dtype=np.float32),
                    "new_k": rng.standard_normal((1, s, d), dtype=np.float32)}  # fmt: skip
            diff = float(np.abs(sessions["kernel"].run(None, feed)[0] - sessions["function"].run(None, feed)[0]).max())
            got = paired({f: (lambda i, f=f: sessions[f].run(None, feed)) for f in ("function", "kernel")}, rounds, 100)
            print(f"  {name:8s} {s} token(s): function {got['function'][0] * 1e3:.1f} us  kernel "
                  f"{got['kernel'][0] * 1e3:.1f} us  kernel / function {got['kernel'][1]:.3f}  max |diff| {diff:.1e}")


def random_past(cfg, rng, length: int):
    return [(rng.standard_normal((1, length, cfg["kv_lora_rank"]), dtype=np.float32),
             rng.standard_normal((1, length, cfg["qk_rope_head_dim"]), dtype=np.float32))
            for _ in range(cfg["num_hidden_layers"])]  # fmt: skip


def trunk_ab(artifact: Path, rounds: int, threads: int, past: int) -> None:
    engines = {"kernel": open_engines(artifact, threads=threads)}
    with mock.patch.object(latent_attention, "use_latent_attention", lambda model, array: {}):
        engines["function"] = open_engines(artifact, threads=threads)
    assert engines["kernel"]["trunk"].attention_kernels > 0, "no MlaAttention on the kernel (no C compiler?)"
    cfg, rng = engines["kernel"].manifest["config"], np.random.default_rng(1)
    pasts = random_past(cfg, rng, past)
    print(f"2. the trunk of {artifact} ({threads} thread(s), past {past}): kernel / function")
    for s in (1, 2, 4):
        feed = io.trunk_feed(rng.integers(0, cfg["vocab_size"], (1, s)), (past + np.arange(s))[None],
                             np.ones((1, past + s), np.int64), pasts)  # fmt: skip
        got = paired({f: (lambda i, f=f: engines[f]["trunk"].run(feed)) for f in ("function", "kernel")}, rounds, 40)
        print(f"  {s} token(s): function {got['function'][0]:.3f} ms  kernel {got['kernel'][0]:.3f} ms  "
              f"kernel / function {got['kernel'][1]:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--past", type=int, default=100)
    args = ap.parse_args()
    if native.kernel_library() is None:
        raise SystemExit("no C compiler: nextn's kernels cannot be built here")
    if args.artifact is None:
        from nextn.embedded import embedded_default

        args.artifact = embedded_default()
    op_alone(args.rounds, args.threads, args.past)
    trunk_ab(args.artifact, args.rounds, args.threads, args.past)


if __name__ == "__main__":
    main()
