"""The quantized forms on single linears: layouts, rounding and the Q/DQ arithmetic, against numpy."""

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nextn.calib.gptq import gptq
from nextn.calib.observe import TensorStats, calibrated_amax, chunks
from nextn.calib.rewrite import (
    apply_nbits, apply_qdq, find_experts, find_linears, quantize_rtn, quantize_weight_qdq, weight_kn,
)  # fmt: skip


def _linear_model(w: np.ndarray, gemm: bool = False) -> onnx.ModelProto:
    """y = x @ w as MatMul (w [K, N]) or as Gemm with transB (stored [N, K])."""
    k, n = w.shape
    if gemm:
        node = helper.make_node("Gemm", ["x", "w"], ["y"], name="lin", transB=1)
        init = numpy_helper.from_array(np.ascontiguousarray(w.T), "w")
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="lin")
        init = numpy_helper.from_array(w, "w")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], [init])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 48, 80])  # 48: a last block of padding; 80: an odd number of blocks
def test_matmulnbits_layout_is_the_dequantized_weight(bits, k):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, 5)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    model = _linear_model(w)
    (lin,), _ = find_linears(model)
    q = quantize_rtn(w, 32, bits)
    apply_nbits(model, {lin.node: (lin, q)}, accuracy_level=0)  # 0: float arithmetic, the layout alone
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    np.testing.assert_allclose(_run(model, x), x @ q.dequantize(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_is_at_most_half_a_step(bits):
    w = np.random.default_rng(1).standard_normal((96, 7)).astype(np.float32)
    q = quantize_rtn(w, 32, bits)
    step = np.repeat(q.scale, 32, axis=0)  # [K, N]
    assert (np.abs(w - q.dequantize()) <= step / 2 + 1e-6).all()
    assert q.q.max() <= 2**bits - 1


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    w = np.random.default_rng(2).standard_normal((64, 9)).astype(np.float32)
    g = gptq(w, np.eye(64) * 3.0, 32)
    np.testing.assert_array_equal(g.q, quantize_rtn(w, 32).q)


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((64, 64)) * 0.5 + np.eye(64)
    x = (rng.standard_normal((512, 64)) @ mix).astype(np.float32)  # correlated inputs
    w = rng.standard_normal((64, 16)).astype(np.float32)
    err = {name: np.linalg.norm(x @ (w - q.dequantize()))
           for name, q in (("rtn", quantize_rtn(w, 32)), ("gptq", gptq(w, x.T.astype(np.float64) @ x, 32)))}  # fmt: skip
    assert err["gptq"] < 0.8 * err["rtn"], err


@pytest.mark.parametrize("gemm", [False, True])
def test_int8_qdq_is_the_numpy_simulation(gemm):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((40, 6)).astype(np.float32)
    x = rng.standard_normal((5, 40)).astype(np.float32)
    model = _linear_model(w, gemm)
    (lin,), _ = find_linears(model)
    assert weight_kn(model, lin).shape == (40, 6)
    amax = float(np.abs(x).max()) * 0.8  # clips the largest inputs too
    apply_qdq(model, [lin], {"x": amax}, "int8")
    s = amax / 127
    xq = (np.clip(np.rint(x / s) + 128, 0, 255) - 128) * s
    wq, ws = quantize_weight_qdq(w, "int8")
    np.testing.assert_allclose(_run(model, x), xq @ (wq.astype(np.float32) * ws), rtol=1e-5, atol=1e-5)


def test_fp8_qdq_is_the_numpy_simulation():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 6)).astype(np.float32)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    model = _linear_model(w)
    (lin,), _ = find_linears(model)
    amax = float(np.abs(x).max())
    apply_qdq(model, [lin], {"x": amax}, "fp8")
    s = np.float32(amax / 448)
    xq = np.clip(x / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s
    wq, ws = quantize_weight_qdq(w, "fp8")
    assert ws.shape == () and wq.dtype == ml_dtypes.float8_e4m3fn  # per-tensor, TensorRT's FP8 form
    np.testing.assert_allclose(_run(model, x), xq @ (wq.astype(np.float32) * ws), rtol=1e-5, atol=1e-5)


def test_routers_stay_float_and_silu_gates_do_not(tiny_artifact):
    model = onnx.load(str(tiny_artifact / "trunk.onnx"), load_external_data=False)
    linears, routers = find_linears(model)
    moe_layers = 2  # tiny_config: 3 layers, the first dense
    assert len(routers) == moe_layers
    producer = {o: n for n in model.graph.node for o in n.output}
    chosen = {lin.node for lin in linears}
    routers_in = {producer[n.input[0]].name for n in model.graph.node if n.op_type == "MoEGroupRouter"}
    assert routers_in == set(routers) and not routers_in & chosen
    gates = {producer[n.input[0]].name for n in model.graph.node
             if n.op_type == "Sigmoid" and producer[n.input[0]].op_type == "MatMul"}  # fmt: skip
    assert gates and gates <= chosen  # SiLU gates feed Sigmoid *and* its Mul: they are linears
    # the routed experts live in the fused MoE nodes (export --moe fused), one per MoE layer
    assert len(find_experts(model)) == moe_layers
    assert sum(lin.head for lin in linears) == 1


def test_activation_range_methods():
    x = np.random.default_rng(6).standard_normal(100_000).astype(np.float32)
    x[:3] = [40.0, -35.0, 30.0]  # outliers
    s = TensorStats()
    s.update_range(x[None])
    s.update_hist(x)
    assert calibrated_amax(s, "minmax") == pytest.approx(40.0)
    assert 3.0 < calibrated_amax(s, "percentile", 99.99) < 6.0
    assert 2.5 < calibrated_amax(s, "entropy") < 10.0


def test_histogram_keeps_values_a_hair_above_pass_one_max():
    s = TensorStats()
    s.update_range(np.array([[1.0, -2.0]], np.float32))
    s.update_hist(np.array([1.0, 2.0000002], np.float32))  # a threaded reduction may round up
    assert s.hist.sum() == 2 and s.hist[-1] == 1


def test_chunks_cover_the_sequence_in_decode_and_verify_shapes():
    c = chunks(20)
    assert c[0] == (0, 10) and c[-1][1] == 20
    assert all(a == b for (_, a), (b, _) in zip(c, c[1:]))
    assert {b - a for a, b in c[1:-1]} == {1, 4}


@pytest.mark.slow
def test_a_probe_computes_what_the_engine_computes(embedded_cache, tmp_path):
    """Probes read every weight from the shared mapping: their outputs must be the artifact's own. (The
    embedded model: its kv_b_proj slices are large enough that ONNX Runtime's constant folding reads them
    from the file, which a probe only has as a placeholder.)"""
    artifact = embedded_cache
    from nextn.calib.observe import open_probe
    from nextn.export.manifest import read_manifest
    from nextn.runtime.engines import SharedWeights, open_engines

    cfg = read_manifest(artifact)["config"]
    feed = {"input_ids": np.array([[5, 6, 7, 8]]), "position_ids": np.arange(4)[None],
            "attention_mask": np.ones((1, 4), np.int64)}  # fmt: skip
    for i in range(cfg["num_hidden_layers"]):
        feed[f"past.{i}.c_kv"] = np.zeros((1, 0, cfg["kv_lora_rank"]), np.float32)
        feed[f"past.{i}.k_pe"] = np.zeros((1, 0, cfg["qk_rope_head_dim"]), np.float32)
    shared = SharedWeights(artifact / "weights.bin")
    probe = open_probe("trunk", artifact / "trunk.onnx", [], shared, tmp_path, threads=1)
    got = probe.session.run(["logits"], feed)[0]
    with open_engines(artifact) as engines:
        want = engines["trunk"].run(feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_probe_keeps_its_weights_mapping_alive(tiny_artifact, tmp_path):
    """The session borrows the mapping's memory: a probe must hold it even when the caller does not.
    (In a subprocess: the failure this guards against is a segfault.)"""
    import subprocess
    import sys

    code = f"""
import gc, numpy as np
from pathlib import Path
from nextn.calib.observe import open_probe
from nextn.runtime.engines import SharedWeights
art = Path({str(tiny_artifact)!r})
probe = open_probe("trunk", art / "trunk.onnx", [], SharedWeights(art / "weights.bin"), Path({str(tmp_path)!r}), 1)
gc.collect()
np.zeros(1 << 24).sum()  # reuse freed memory
feed = {{"input_ids": np.array([[5, 6]]), "position_ids": np.arange(2)[None], "attention_mask": np.ones((1, 2), np.int64)}}
for i in range(3):
    feed[f"past.{{i}}.c_kv"] = np.zeros((1, 0, 32), np.float32); feed[f"past.{{i}}.k_pe"] = np.zeros((1, 0, 8), np.float32)
print(float(np.abs(probe.session.run(["logits"], feed)[0]).max()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])


# -- fused MoE experts -> QMoE --------------------------------------------------------------------------
def _moe_model(w13: np.ndarray, w2: np.ndarray, k: int = 2) -> onnx.ModelProto:
    e, h, _ = w2.shape
    node = helper.make_node("MoE", ["x", "rp", "w13", "", "w2"], ["y"], name="moe", domain="com.microsoft", k=k,
                            activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)  # fmt: skip
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", h]),
                                            helper.make_tensor_value_info("rp", TensorProto.FLOAT, ["n", e])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", h])],
                              [numpy_helper.from_array(w13, "w13"), numpy_helper.from_array(w2, "w2")])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])


def _moe_numpy(x, rp, w13, w2, k=2):
    """The MoE op's arithmetic: softmax of router_probs over the picked experts, silu(gate) * up."""
    y = np.zeros_like(x)
    for t in range(len(x)):
        ids = np.argsort(-rp[t])[:k]
        p = np.exp(rp[t, ids] - rp[t, ids].max())
        for e, wt in zip(ids, p / p.sum()):
            g = w13[e] @ x[t]
            y[t] += wt * (w2[e] @ (g[0::2] / (1 + np.exp(-g[0::2])) * g[1::2]))
    return y


def _routing(rng, n, e, k=2):
    rp = np.full((n, e), -np.inf, np.float32)
    for t in range(n):
        rp[t, rng.choice(e, k, replace=False)] = np.log(rng.uniform(0.1, 1.0, k))
    return rp


@pytest.mark.parametrize("bits", [4, 8])
def test_qmoe_layout_is_the_dequantized_experts(bits):
    from nextn.calib.rewrite import apply_qmoe

    rng = np.random.default_rng(7)
    e, h, i = 4, 64, 32
    w13 = (rng.standard_normal((e, 2 * i, h)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((e, h, i)) * 0.2).astype(np.float32)
    model = _moe_model(w13, w2)
    (ex,) = find_experts(model)
    assert (ex.x, ex.probs, ex.n_experts, ex.hidden, ex.inter) == ("x", "rp", e, h, i)
    fc1 = [quantize_rtn(np.ascontiguousarray(w13[j].T), 32, bits) for j in range(e)]
    fc2 = [quantize_rtn(np.ascontiguousarray(w2[j].T), 32, bits) for j in range(e)]
    apply_qmoe(model, {"moe": (fc1, fc2)}, accuracy_level=0)
    assert [n.op_type for n in model.graph.node] == ["QMoE"]
    x = rng.standard_normal((5, h)).astype(np.float32)
    rp = _routing(rng, 5, e)
    dq13 = np.stack([q.dequantize().T for q in fc1])
    dq2 = np.stack([q.dequantize().T for q in fc2])
    want = _moe_numpy(x, rp, dq13, dq2)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x, "rp": rp})[0]
    # 4 bits at accuracy level 0 is float arithmetic: the layout alone. ONNX Runtime's 8-bit QMoE always
    # quantizes activations to int8 (per its docs), hence a looser bound there.
    tol = 1e-5 if bits == 4 else 2e-2 * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol)


def test_expert_stats_route_rows_to_their_experts():
    from nextn.calib.experts import ExpertStats
    from nextn.calib.rewrite import Experts

    rng = np.random.default_rng(8)
    e, h, i = 4, 16, 8
    w13 = rng.standard_normal((e, 2 * i, h)).astype(np.float32)
    x = rng.standard_normal((6, h)).astype(np.float32)
    rp = _routing(rng, 6, e)
    st = ExpertStats(Experts("moe", "x", "rp", "w13", "w2", e, h, i), w13)
    st.update(x[None], rp[None])  # [B, S, H] as probes return it
    for j in range(e):
        rows = x[np.isfinite(rp[:, j])].astype(np.float64)
        assert st.rows[j] == len(rows)
        if not len(rows):
            assert st.h1[j] is None
            continue
        g = rows @ w13[j].T.astype(np.float64)
        a = g[:, 0::2] / (1 + np.exp(-g[:, 0::2])) * g[:, 1::2]
        np.testing.assert_allclose(st.h1[j], rows.T @ rows, rtol=1e-10)
        np.testing.assert_allclose(st.h2[j], a.T @ a, rtol=1e-4)
