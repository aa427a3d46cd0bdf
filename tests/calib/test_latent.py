"""MLA's per-head absorbed weights in 8 bits: found through the shape ops, replaced, arithmetic as specified."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nextn.calib.latent import apply_latent_int8, find_batched_weights, latent_inputs, quantize_batched

NH, DN, DV, R = 3, 8, 6, 16


def _absorbed_model(kv_b: np.ndarray) -> onnx.ModelProto:
    """The exported form: kv_b [nh * (dn + dv), R] -> Reshape -> Slice W_UK / Slice + Transpose W_UV^T."""
    ints = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    inits = [numpy_helper.from_array(kv_b, "kv_b"), ints("shape", [NH, DN + DV, R]), ints("zero", [0]),
             ints("dn", [DN]), ints("end", [DN + DV]), ints("one", [1])]  # fmt: skip
    nodes = [
        helper.make_node("Reshape", ["kv_b", "shape"], ["w"]),
        helper.make_node("Slice", ["w", "zero", "dn", "one", "one"], ["w_uk"]),  # [nh, dn, R]
        helper.make_node("Slice", ["w", "dn", "end", "one", "one"], ["w_uv"]),  # [nh, dv, R]
        helper.make_node("Transpose", ["w_uv"], ["w_uv_t"], perm=[0, 2, 1]),  # [nh, R, dv]
        helper.make_node("MatMul", ["q", "w_uk"], ["q_lat"], name="uk"),  # [B, nh, S, R]
        helper.make_node("MatMul", ["q_lat", "w_uv_t"], ["o"], name="uv"),  # [B, nh, S, dv]
        helper.make_node("MatMul", ["q", "q_t"], ["qq"], name="activations"),  # no constant B: left alone
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, NH, "s", DN]),
         helper.make_tensor_value_info("q_t", TensorProto.FLOAT, [1, NH, DN, "s"])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("qq", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _static_quant_matmul(x: np.ndarray, w: np.ndarray, amax: float) -> np.ndarray:
    """The specified arithmetic: x to int8 at the calibrated scale amax / 127, W per head and column."""
    xs = np.float32(amax / 127.0)
    xq = np.clip(np.rint(x / xs), -128, 127)
    q, ws = quantize_batched(w)
    return (xq @ q.astype(np.float64)) * xs * ws


def test_finds_the_per_head_weights_through_the_shape_ops():
    kv_b = np.random.default_rng(0).standard_normal((NH * (DN + DV), R)).astype(np.float32)
    found = {f.node: f for f in find_batched_weights(_absorbed_model(kv_b))}
    assert set(found) == {"uk", "uv"}
    assert latent_inputs(_absorbed_model(kv_b)) == ["q", "q_lat"]  # structure alone, for the probes
    w = kv_b.reshape(NH, DN + DV, R)
    np.testing.assert_array_equal(found["uk"].w, w[:, :DN])
    np.testing.assert_array_equal(found["uv"].w, w[:, DN:].transpose(0, 2, 1))


def test_a_folded_3d_initializer_counts_too():
    w = np.random.default_rng(3).standard_normal((NH, DN, R)).astype(np.float32)
    node = helper.make_node("MatMul", ["q", "w"], ["y"], name="uk")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, NH, 1, DN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])  # fmt: skip
    (found,) = find_batched_weights(helper.make_model(graph))
    np.testing.assert_array_equal(found.w, w)


def test_replaced_by_int8_products_and_the_fp32_weight_is_gone():
    rng = np.random.default_rng(1)
    kv_b = rng.standard_normal((NH * (DN + DV), R)).astype(np.float32)
    model = _absorbed_model(kv_b)
    w = kv_b.reshape(NH, DN + DV, R)
    q = rng.standard_normal((1, NH, 3, DN)).astype(np.float32)
    amax = {"q": float(np.abs(q).max()), "q_lat": float(np.abs(q @ w[:, :DN]).max())}  # as calibration finds them
    apply_latent_int8(model, find_batched_weights(model), amax)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 and ops.count("QuantizeLinear") == 2 and ops.count("MatMul") == 1
    assert not {"Reshape", "Slice", "Transpose"} & set(ops)  # the dead chain is removed
    assert "kv_b" not in {t.name for t in model.graph.initializer}
    feed = {"q": q, "q_t": rng.standard_normal((1, NH, DN, 3)).astype(np.float32)}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    o, qq = session.run(None, feed)
    q_lat = _static_quant_matmul(q, w[:, :DN], amax["q"]).astype(np.float32)
    expect = _static_quant_matmul(q_lat, w[:, DN:].transpose(0, 2, 1), amax["q_lat"])
    np.testing.assert_allclose(o, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())
    np.testing.assert_allclose(qq, q @ feed["q_t"], rtol=1e-5)
    exact = q @ w[:, :DN] @ w[:, DN:].transpose(0, 2, 1)
    assert 0 < np.abs(o - exact).max() < 0.05 * np.abs(exact).max()  # quantized, and close
    # each row alone gives the same result: a verify pass computes what one-token steps compute
    one = session.run(None, {"q": q[:, :, 1:2], "q_t": feed["q_t"][..., 1:2]})[0]
    np.testing.assert_array_equal(one, o[:, :, 1:2])


def test_int8_weight_error_is_at_most_half_a_step():
    w = np.random.default_rng(2).standard_normal((2, 32, 5)).astype(np.float32)
    q, scale = quantize_batched(w)
    assert q.dtype == np.int8 and scale.shape == (2, 1, 5) and np.abs(q).max() == 127
    assert (np.abs(w - q * scale) <= scale / 2 + 1e-7).all()
