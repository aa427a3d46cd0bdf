"""What a verify pass costs in decoding, per form of the routed experts, and why drafting pays or not.

    python benchmarks/verify_cost.py [ARTIFACT] [--rounds 7] [--threads 1]
    (no artifact: the embedded model's fp32 export)

The trunk at 1..5 new tokens after a past of 100, each pass preceded by one MTP call per extra token (as
in a draft-and-verify step, so the trunk's weights are as cold in the CPU caches as they are there),
medians over interleaved rounds, in three forms of the same trunk built in memory:

  fused   the artifact's graph: ONNX Runtime's MoE op (fp32); per expert it transposes-and-packs the
          weights of every expert a token picked, on every call
  dense   every expert on every token as two prepacked MatMuls (E x the FLOPs, all experts' bytes), routed
          weights applied to the activations: exact to fp32 rounding
  qmoe8   QMoE with 8-bit round-to-nearest experts (lossy: what int8 artifacts run)

prints ms per width and the ratio to one token: the verify cost c_K of drafting K = width - 1 tokens.
"""

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from nextn.calib.rewrite import apply_qmoe, find_experts, quantize_rtn
from nextn.embedded import embedded_artifact


def dense_moe(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each MoE node -> Softmax(router_probs) weights, x @ [H, E*2I], SwiGLU, * weights, @ [E*I, H]."""
    inits = {t.name: t for t in model.graph.initializer}
    experts = {e.node: e for e in find_experts(model)}
    nodes = []
    for n in model.graph.node:
        if n.name not in experts:
            nodes.append(n)
            continue
        w13 = numpy_helper.to_array(inits[experts[n.name].w13])  # [E, 2I, H], gate/up rows interleaved
        w2 = numpy_helper.to_array(inits[experts[n.name].w2])  # [E, H, I]
        e, i2, h = w13.shape
        gate_up = np.concatenate([w13[:, 0::2], w13[:, 1::2]], axis=1)  # [E, 2I, H]: gate rows, then up rows
        p = n.name.replace("/", "_")
        model.graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(gate_up.transpose(2, 0, 1).reshape(h, e * i2)), f"{p}_w13"),
            numpy_helper.from_array(np.ascontiguousarray(w2.transpose(0, 2, 1).reshape(e * i2 // 2, h)), f"{p}_w2"),
            numpy_helper.from_array(np.array([0, e, i2], np.int64), f"{p}_s1"),
            numpy_helper.from_array(np.array([0, e * i2 // 2], np.int64), f"{p}_s2"),
            numpy_helper.from_array(np.array([2], np.int64), f"{p}_ax"),
        ])  # fmt: skip
        x, probs, out = n.input[0], n.input[1], n.output[0]
        nodes += [
            helper.make_node("Softmax", [probs], [f"{p}_w"], axis=-1),  # [N, E], 0 at unpicked experts
            helper.make_node("Unsqueeze", [f"{p}_w", f"{p}_ax"], [f"{p}_w3"]),
            helper.make_node("MatMul", [x, f"{p}_w13"], [f"{p}_gu"]),  # [N, E * 2I]
            helper.make_node("Reshape", [f"{p}_gu", f"{p}_s1"], [f"{p}_gu3"]),
            helper.make_node("Split", [f"{p}_gu3"], [f"{p}_g", f"{p}_u"], axis=2, num_outputs=2),
            helper.make_node("Sigmoid", [f"{p}_g"], [f"{p}_sg"]),
            helper.make_node("Mul", [f"{p}_g", f"{p}_sg"], [f"{p}_silu"]),
            helper.make_node("Mul", [f"{p}_silu", f"{p}_u"], [f"{p}_a"]),
            helper.make_node("Mul", [f"{p}_a", f"{p}_w3"], [f"{p}_aw"]),
            helper.make_node("Reshape", [f"{p}_aw", f"{p}_s2"], [f"{p}_aw2"]),
            helper.make_node("MatMul", [f"{p}_aw2", f"{p}_w2"], [out]),
        ]  # fmt: skip
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def qmoe8(model: onnx.ModelProto) -> onnx.ModelProto:
    inits = {t.name: t for t in model.graph.initializer}
    q = {}
    for ex in find_experts(model):
        w13, w2 = numpy_helper.to_array(inits[ex.w13]), numpy_helper.to_array(inits[ex.w2])
        q[ex.node] = ([quantize_rtn(np.ascontiguousarray(w.T), 32, 8) for w in w13],
                      [quantize_rtn(np.ascontiguousarray(w.T), 32, 8) for w in w2])  # fmt: skip
    apply_qmoe(model, q)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", nargs="?")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    art = args.artifact or str(embedded_artifact())

    def session(model):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = args.threads, 3
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    load = lambda name: onnx.load(f"{art}/{name}")  # noqa: E731
    forms = {"fused": session(load("trunk.onnx")), "dense": session(dense_moe(load("trunk.onnx"))),
             "qmoe8": session(qmoe8(load("trunk.onnx")))}  # fmt: skip
    mtp = session(load("mtp_0.onnx"))
    cfg = __import__("json").load(open(f"{art}/manifest.json"))["config"]
    rng = np.random.default_rng(0)
    p, widths = 100, (1, 2, 3, 4, 5)
    past = {}
    for i in range(cfg["num_hidden_layers"]):
        past[f"past.{i}.c_kv"] = rng.standard_normal((1, p, cfg["kv_lora_rank"])).astype(np.float32)
        past[f"past.{i}.k_pe"] = rng.standard_normal((1, p, cfg["qk_rope_head_dim"])).astype(np.float32)
    mtp_feed = {"hidden": rng.standard_normal((1, 2, cfg["hidden_size"])).astype(np.float32),
                "position_ids": np.arange(p, p + 2)[None], "attention_mask": np.ones((1, p + 2), np.int64),
                "past.c_kv": past["past.0.c_kv"], "past.k_pe": past["past.0.k_pe"],
                "output_rows": np.arange(2)[None]}  # fmt: skip
    times: dict = {}
    for _ in range(args.rounds):
        for name, s in forms.items():
            for w in widths:
                feed = {"position_ids": np.arange(p, p + w)[None], "attention_mask": np.ones((1, p + w), np.int64), **past}
                ts = []
                for _ in range(30):
                    for _ in range(w - 1):
                        mtp.run(None, {"input_ids": rng.integers(0, cfg["vocab_size"], (1, 2)), **mtp_feed})
                    ids = rng.integers(0, cfg["vocab_size"], (1, w))
                    t = time.perf_counter()
                    s.run(None, {"input_ids": ids, **feed})
                    ts.append(time.perf_counter() - t)
                times.setdefault((name, w), []).append(statistics.median(ts) * 1e3)
    for name in forms:
        ms = [statistics.median(times[name, w]) for w in widths]
        print(f"{name:6s} " + "  ".join(f"S={w} {m:.3f} ms ({m / ms[0]:.2f})" for w, m in zip(widths, ms)))


if __name__ == "__main__":
    main()
