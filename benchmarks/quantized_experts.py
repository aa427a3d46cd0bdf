"""nextn.QRoutedExperts (runtime/routed_experts.py use_quantized_experts) against ONNX Runtime's QMoE.

    python benchmarks/quantized_experts.py [--bits 4,8] [--threads 1,2] [--rounds 15] [--artifact DIR]

1. The op alone: 11 layers of issue 14's 1 GB checkpoint's expert shapes (E 16, H 1024, I 256, top 4, blocks of
   64; random weights quantized round-to-nearest, ~17 MB a token at 4 bits: DRAM-resident), one after another,
   as com.microsoft.QMoE and as nextn.QRoutedExperts, at 1 and 4 rows; the two alternate within each round.
   Prints medians, kernel / QMoE, and GB/s of the experts one token reads (4 rows: their distinct experts).
2. With --artifact (a quantized one, e.g. `nextn calibrate ... --scheme int4`): its trunk opened with and without
   the rewrite, at 1, 2 and 4 new tokens after 64 random cache entries, alternating; and the largest logit
   difference, relative to the largest logit.
"""

import argparse
import statistics
import time
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nextn.calib.rewrite import MS_DOMAIN, pack_qmoe, quantize_rtn
from nextn.export import io
from nextn.runtime import native, routed_experts
from nextn.runtime.engines import open_engines

LAYERS, E, H, I, K, BLOCK = 11, 16, 1024, 256, 4, 64


def qmoe_graph(rng, bits: int) -> onnx.ModelProto:
    """LAYERS QMoE nodes in a chain (x_l -> x_{l+1}), each with its own routing input p_l."""
    nodes, inits = [], []
    for layer in range(LAYERS):
        for name, (k, n) in (("fc1", (H, 2 * I)), ("fc2", (I, H))):
            ws = [quantize_rtn((rng.standard_normal((k, n)) * 0.03).astype(np.float32), BLOCK, bits) for _ in range(E)]
            inits += [numpy_helper.from_array(a, f"{name}{layer}{sfx}") for a, sfx in zip(pack_qmoe(ws), "qsz")]
        nodes.append(helper.make_node(
            "QMoE", [f"x{layer}", f"p{layer}", f"fc1{layer}q", f"fc1{layer}s", "", f"fc2{layer}q", f"fc2{layer}s",
                     "", "", "", "", f"fc1{layer}z", f"fc2{layer}z"], [f"x{layer + 1}"], domain=MS_DOMAIN, k=K,
            activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
            normalize_routing_weights=0, expert_weight_bits=bits, block_size=BLOCK, accuracy_level=4))  # fmt: skip
    inputs = [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [None, H])]
    inputs += [helper.make_tensor_value_info(f"p{layer}", TensorProto.FLOAT, [None, E]) for layer in range(LAYERS)]
    graph = helper.make_graph(nodes, "experts", inputs, [helper.make_tensor_value_info(f"x{LAYERS}", TensorProto.FLOAT, None)],
                              inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(str(native.kernel_library()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def feeds(rng, rows: int, count: int = 4) -> list[dict]:
    """Random tokens and MoEGroupRouter-style routing (log weights at K experts, -inf elsewhere)."""
    out = []
    for _ in range(count):
        f = {"x0": (rng.standard_normal((rows, H)) * 0.5).astype(np.float32)}
        for layer in range(LAYERS):
            p = np.full((rows, E), -np.inf, np.float32)
            for r in range(rows):
                p[r, rng.choice(E, K, replace=False)] = np.log(rng.uniform(0.1, 1, K))
            f[f"p{layer}"] = p
        out.append(f)
    return out


def alternate(runs: dict, rounds: int) -> dict[str, float]:
    """Each callable once per round, alternating; -> median ms per call."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            calls = run()
            times[name].append((time.perf_counter() - t0) / calls * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def op_alone(bits: int, threads: int, rounds: int) -> None:
    rng = np.random.default_rng(0)
    model = qmoe_graph(rng, bits)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    stacks = routed_experts.use_quantized_experts(rewritten, arrays.__getitem__)
    for t in rewritten.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(stacks[t.name], t.name))
    forms = {"qmoe": session(model, threads), "kernel": session(rewritten, threads)}
    for rows in (1, 4):
        fs = feeds(rng, rows)
        ms = alternate({n: (lambda s=s: [s.run(None, f) for f in fs] and len(fs)) for n, s in forms.items()}, rounds)
        # experts one call reads, over its layers: those any row picked
        distinct = np.mean([sum(np.isfinite(f[f"p{i}"]).any(0).sum() for i in range(LAYERS)) for f in fs])
        mb = distinct * (3 * H * I) * bits / 8 / 1e6
        print(f"{bits}-bit, {threads} thread(s), {rows} row(s): QMoE {ms['qmoe']:.2f} ms, QRoutedExperts "
              f"{ms['kernel']:.2f} ms ({ms['kernel'] / ms['qmoe']:.2f}x); {mb:.1f} MB: {mb / ms['qmoe']:.1f} -> "
              f"{mb / ms['kernel']:.1f} GB/s")  # fmt: skip


def trunk(artifact: str, threads: int, rounds: int) -> None:
    kernel = open_engines(artifact, threads=threads, prepack=True)
    with mock.patch.object(routed_experts, "use_quantized_experts", lambda model, array: {}):
        qmoe = open_engines(artifact, threads=threads, prepack=True)
    cfg, rng, past_len = kernel.manifest["config"], np.random.default_rng(1), 64
    past = [(rng.standard_normal((1, past_len, cfg["kv_lora_rank"]), dtype=np.float32),
             rng.standard_normal((1, past_len, cfg["qk_rope_head_dim"]), dtype=np.float32))
            for _ in range(cfg["num_hidden_layers"])]  # fmt: skip
    print(f"{artifact}: {kernel['trunk'].routed_experts} QMoE nodes on the kernel, {threads} thread(s)")
    for s in (1, 2, 4):
        fs = [io.trunk_feed(rng.integers(0, cfg["vocab_size"], (1, s)), (past_len + np.arange(s))[None],
                            np.ones((1, past_len + s), np.int64), past) for _ in range(3)]  # fmt: skip
        want, got = qmoe["trunk"].run(fs[0])[0], kernel["trunk"].run(fs[0])[0]
        runs = {n: (lambda e=e: [e["trunk"].run(f) for f in fs] and len(fs)) for n, e in (("qmoe", qmoe), ("kernel", kernel))}
        ms = alternate(runs, rounds)
        print(f"  {s} token(s): QMoE {ms['qmoe']:.2f} ms, kernel {ms['kernel']:.2f} ms ({ms['kernel'] / ms['qmoe']:.2f}x); "
              f"logits {np.abs(got - want).max() / np.abs(want).max():.1e} apart")  # fmt: skip
    kernel.close()
    qmoe.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="4,8")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--artifact")
    a = p.parse_args()
    if native.kernel_library() is None:
        raise SystemExit("nextn's kernels could not be built here (no C compiler): nothing to compare")
    for threads in (int(t) for t in a.threads.split(",")):
        for bits in (int(b) for b in a.bits.split(",")):
            op_alone(bits, threads, a.rounds)
        if a.artifact:
            trunk(a.artifact, threads, max(3, a.rounds // 2))


if __name__ == "__main__":
    main()
