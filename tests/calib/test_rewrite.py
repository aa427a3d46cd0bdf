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
    apply_nbits, apply_qdq, find_linears, quantize_rtn, quantize_weight_qdq, weight_kn,
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
    names = {lin.w for lin in linears}
    assert any("experts.0.gate_proj" in n for n in names)  # feeds SiLU's Sigmoid *and* its Mul
    assert not any("mlp.gate.weight" in n for n in names)
    assert sum(lin.head for lin in linears) == 1


def test_activation_range_methods():
    x = np.random.default_rng(6).standard_normal(100_000).astype(np.float32)
    x[:3] = [40.0, -35.0, 30.0]  # outliers
    s = TensorStats()
    s.update_range(x[None], hessian=False)
    s.update_hist(x)
    assert calibrated_amax(s, "minmax") == pytest.approx(40.0)
    assert 3.0 < calibrated_amax(s, "percentile", 99.99) < 6.0
    assert 2.5 < calibrated_amax(s, "entropy") < 10.0


def test_histogram_keeps_values_a_hair_above_pass_one_max():
    s = TensorStats()
    s.update_range(np.array([[1.0, -2.0]], np.float32), hessian=False)
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
