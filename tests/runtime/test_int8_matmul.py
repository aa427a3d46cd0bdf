"""nextn's int8 linear kernel (runtime/int8_matmul.py, kernels/int8_matmul.c): ONNX Runtime's fused form of
calibrate's static Q/DQ linears, bit for bit, for any row count, and the same for a row whatever else is in the
call."""

from unittest import mock

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nextn.calib.rewrite import apply_qdq, find_linears
from nextn.runtime import int8_matmul, native

from kernel_sessions import (  # tests/runtime: shared by the kernels' tests
    assert_drafting_is_lossless, assert_rows_are_independent, kernel_session, on_kernel, trunk_feed)


def _qdq_graph(rng, k: int, ns: tuple[int, ...], amax: float = 2.0) -> onnx.ModelProto:
    """x [.., K] -> one linear per N in `ns` (siblings reading x), each quantized as `nextn calibrate --scheme
    int8` writes it (apply_qdq), its output a graph output."""
    weights = [numpy_helper.from_array((rng.standard_normal((k, n)) * 0.1).astype(np.float32), f"w{i}")
               for i, n in enumerate(ns)]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(len(ns))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(ns))],
                              weights)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    linears, _ = find_linears(model)
    apply_qdq(model, linears, {"x": amax}, "int8")
    return model


def _on_kernel(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    return on_kernel(model, int8_matmul.use_int8_matmul)


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("k,ns", [(1024, (288, 384)), (384, (1536,)), (40, (300,)), (7, (5, 33)), (2816, (64,))])
def test_the_kernel_computes_onnxruntimes_fused_qdq_linear_bit_for_bit(k, ns):
    # (1024, (288, 384)): issue 14's q_a / kv_a siblings; (40, 300), (7, (5, 33)): K not whole groups of 4 and N
    # not whole tiles of 16; (2816, (64,)): a long K (the dense layer's down projection)
    rng = np.random.default_rng(k)
    model = _qdq_graph(rng, k, ns)
    rewritten, arrays = _on_kernel(model)
    assert [(m.domain, m.op_type) for m in rewritten.graph.node] == [(native.DOMAIN, int8_matmul.OP_TYPE)] * len(ns)
    assert all(arrays[f"mm{i}_w_q"].dtype == np.uint8 for i in range(len(ns)))
    want, got, got2 = kernel_session(model), kernel_session(rewritten), kernel_session(rewritten, threads=2)
    for shape in ((1, k), (2, k), (3, k), (4, k), (5, k), (9, k), (70, k), (2, 3, k)):  # 70: two row groups
        x = (rng.standard_normal(shape) * 0.8).astype(np.float32)
        x.reshape(-1)[:3] = (3.0, -3.0, 0.0)  # past the calibrated range: saturated as QuantizeLinear saturates
        ref, out = want.run(None, {"x": x}), got.run(None, {"x": x})
        for a, b in zip(ref, out):
            assert b.shape == a.shape and np.array_equal(a, b), shape
        assert all(np.array_equal(a, b) for a, b in zip(got2.run(None, {"x": x}), out)), shape  # tasks, not sums


@pytest.mark.usefixtures("needs_kernel")
def test_a_rows_output_does_not_depend_on_the_other_rows():
    rng = np.random.default_rng(1)
    assert_rows_are_independent(kernel_session(_on_kernel(_qdq_graph(rng, 256, (600,)))[0]), 256, rng)


def test_the_tiles_hold_the_weights():
    w = np.arange(-60, 60, dtype=np.int8).reshape(6, 20)  # K 6 -> 2 groups of 4 rows, N 20 -> 2 tiles
    tiles = int8_matmul.pack_int8(w).reshape(2, 2, 16, 4).astype(int)  # [tiles, K4, 16, 4] of W + 128
    for k in range(8):
        for n in range(32):
            want = int(w[k, n]) if k < 6 and n < 20 else 0
            assert tiles[n // 16, k // 4, n % 16, k % 4] == want + 128, (k, n)


def test_only_the_plain_int8_form_is_rewritten():
    rng = np.random.default_rng(2)
    shared = _qdq_graph(rng, 16, (8,))
    shared.graph.node.append(helper.make_node("Identity", ["mm0_w_q"], ["w_copy"]))  # another node reads W
    shifted = _qdq_graph(rng, 16, (8,))
    zero = next(t for t in shifted.graph.initializer if t.name == "mm0_w_zero")
    zero.CopyFrom(numpy_helper.from_array(np.ones(8, np.int8), zero.name))  # weights with a zero point
    fp8 = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")]),
        opset_imports=[helper.make_opsetid("", 21)])  # fmt: skip
    apply_qdq(fp8, find_linears(fp8)[0], {"x": 1.0}, "fp8")
    for model in (shared, shifted, fp8):
        rewritten, arrays = _on_kernel(model)
        assert not arrays and all(n.domain == "" for n in rewritten.graph.node)
    partly = _qdq_graph(rng, 16, (8, 8))  # one sibling rewritten, the other kept: the Q/DQ pair stays for it
    partly.graph.node.append(helper.make_node("Identity", ["mm1_w_q"], ["w_copy"]))
    rewritten, arrays = _on_kernel(partly)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count(int8_matmul.OP_TYPE) == 1 and "QuantizeLinear" in ops and ops.count("MatMul") == 1


@pytest.mark.usefixtures("needs_kernel")
def test_the_generic_loop_matches_the_vnni_one():
    """The kernel's portable loop (machines without AVX512-VNNI) computes the same int32 sums."""
    rng = np.random.default_rng(4)
    rewritten = _on_kernel(_qdq_graph(rng, 200, (40,)))[0]
    vnni = kernel_session(rewritten)
    native.kernel_library.cache_clear()
    try:
        with mock.patch.object(native, "CFLAGS", (*native.CFLAGS, "-mno-avx512vnni")):
            portable = kernel_session(rewritten)
    finally:
        native.kernel_library.cache_clear()
    x = rng.standard_normal((5, 200)).astype(np.float32)
    assert np.array_equal(portable.run(None, {"x": x})[0], vnni.run(None, {"x": x})[0])


@pytest.mark.usefixtures("needs_kernel")
def test_an_int8_artifact_decodes_on_the_kernel_as_without_it(tiny_artifact, tmp_path):
    """The tiny artifact calibrated to int8: its trunk's linears on the kernel give ONNX Runtime's logits bit for
    bit, and drafting stays lossless on it (greedy tokens at K = 2 equal K = 0's)."""
    from nextn.calib.calibrate import CalibOptions, calibrate_artifact
    from nextn.runtime.engines import open_engines

    data = tmp_path / "calib.txt"
    rng = np.random.default_rng(5)
    data.write_text("\n".join(" ".join(f"w{t}" for t in rng.integers(2, 256, 24)) for _ in range(6)) + "\n")
    artifact = tmp_path / "int8"
    opts = CalibOptions(scheme="int8", samples=4, seq_len=24, eval_samples=2, min_top1=0.0, decode_report=False)
    calibrate_artifact(tiny_artifact, artifact, [data], [], opts)
    kernel = open_engines(artifact, prepack=True)
    with mock.patch.object(int8_matmul, "use_int8_matmul", lambda model, array: {}):
        fused = open_engines(artifact, prepack=True)
    assert kernel["trunk"].int8_matmuls > 0 and fused["trunk"].int8_matmuls == 0
    cfg = kernel.manifest["config"]
    for s in (1, 4):
        feed = trunk_feed(cfg, rng, s)
        for a, b in zip(fused["trunk"].run(feed), kernel["trunk"].run(feed)):
            assert np.array_equal(a, b)
    kernel.close()
    fused.close()
    assert_drafting_is_lossless(artifact, rng)
