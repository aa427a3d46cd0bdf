"""Routed experts in halves (runtime/expert_halves.py): the same MoE / QMoE, laid out for the threads."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nextn.calib.rewrite import pack_qmoe, quantize_rtn
from nextn.runtime.expert_halves import halve_experts

from kernel_sessions import on_kernel  # tests/runtime: a graph rewritten as a pre-packing session does

E, H, I, N, K = 8, 64, 128, 5, 3  # experts, hidden, expert width, tokens, picked per token
MOE_ATTRS = dict(k=K, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                 normalize_routing_weights=0)  # fmt: skip


def _graph(op: str, weights: dict[str, np.ndarray], inputs: list[str], **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, ["x", "probs", *inputs], ["y"], domain="com.microsoft", name="moe", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, H]),
                      helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, E])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in weights.items()])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _feed(rng):
    probs = np.full((N, E), -np.inf, np.float32)  # log routing weights at the picked experts, as MoEGroupRouter's
    for r in range(N):
        probs[r, rng.choice(E, K, replace=False)] = np.log(rng.uniform(0.1, 1, K))
    return {"x": rng.standard_normal((N, H)).astype(np.float32), "probs": probs}


def _run(model: onnx.ModelProto, feed: dict, threads: int) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so).run(None, feed)[0]


def _halved(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    return on_kernel(model, halve_experts)


def _qmoe(rng, bits: int, block: int) -> onnx.ModelProto:
    fc1 = [quantize_rtn(rng.standard_normal((H, 2 * I)).astype(np.float32) * 0.1, block, bits) for _ in range(E)]
    fc2 = [quantize_rtn(rng.standard_normal((I, H)).astype(np.float32) * 0.1, block, bits) for _ in range(E)]
    weights = {}
    for which, ws in (("fc1", fc1), ("fc2", fc2)):
        for arr, sfx in zip(pack_qmoe(ws), ("_q", "_scales", "_zero_points")):
            weights[which + sfx] = arr
    inputs = ["fc1_q", "fc1_scales", "", "fc2_q", "fc2_scales", "", "", "", "", "fc1_zero_points", "fc2_zero_points"]
    return _graph("QMoE", weights, inputs, **MOE_ATTRS, expert_weight_bits=bits, block_size=block, accuracy_level=4)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_halved_moe_is_the_same_moe(threads):
    rng = np.random.default_rng(0)
    w13 = rng.standard_normal((E, 2 * I, H)).astype(np.float32) * 0.1  # [E, 2I, H], gate/up interleaved
    w2 = rng.standard_normal((E, H, I)).astype(np.float32) * 0.1  # [E, H, I]
    model = _graph("MoE", {"w13": w13, "w2": w2}, ["w13", "", "w2"], **MOE_ATTRS)
    halved, stacks = _halved(model)
    assert stacks["w13"].shape == (2 * E, I, H) and stacks["w2"].shape == (2 * E, H, I // 2)
    assert [n.op_type for n in halved.graph.node] == ["Concat", "MoE"]
    assert next(a.i for a in halved.graph.node[1].attribute if a.name == "k") == 2 * K
    feed = _feed(rng)
    want = _run(model, feed, threads)
    assert np.abs(_run(halved, feed, threads) - want).max() < 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_a_halved_qmoe_is_the_same_qmoe(bits):
    rng = np.random.default_rng(1)
    model = _qmoe(rng, bits, block=32)  # fc2: 4 blocks of 32, two per half (and per zero-point byte at 4 bits)
    halved, stacks = _halved(model)
    assert len(stacks) == 6 and stacks["fc2_scales"].shape == (2 * E, H, 2)
    feed = _feed(rng)
    for threads in (1, 2):
        want = _run(model, feed, threads)
        assert np.abs(_run(halved, feed, threads) - want).max() < 1e-5 * np.abs(want).max()


def test_a_qmoe_whose_halves_split_a_zero_point_byte_is_left_alone():
    model = _qmoe(np.random.default_rng(2), bits=4, block=64)  # fc2: 2 blocks, one zero-point byte holds both
    halved, stacks = _halved(model)
    assert stacks == {} and [n.op_type for n in halved.graph.node] == ["QMoE"]


def test_a_session_halves_stacks_stored_in_the_graph_too(tmp_path):
    # A small model's stacks are stored in the graph file, not in weights.bin: their halves must replace the
    # graph's own bytes (handed over like the mapped ones, the session read the old bytes at the new shape).
    from nextn.runtime.engines import OrtEngine, SharedWeights

    rng = np.random.default_rng(3)
    w13 = rng.standard_normal((E, 2 * I, H)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((E, H, I)).astype(np.float32) * 0.1
    model = _graph("MoE", {"w13": w13, "w2": w2}, ["w13", "", "w2"], **MOE_ATTRS)
    onnx.save(model, str(tmp_path / "g.onnx"))
    (tmp_path / "weights.bin").write_bytes(b"\0")  # nothing mapped
    engine = OrtEngine("g", ["x", "probs"], ["y"], tmp_path / "g.onnx", "cpu", 2, SharedWeights(tmp_path / "weights.bin"),
                       prepack=True, load_forms=True)  # fmt: skip
    feed = _feed(rng)
    want = _run(model, feed, 2)
    assert np.abs(engine.run(feed)[0] - want).max() < 1e-5 * np.abs(want).max()
