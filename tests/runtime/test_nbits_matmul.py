"""nextn's MatMulNBits kernel (runtime/nbits_matmul.py, kernels/nbits_matmul.c): ONNX Runtime's MatMulNBits at
accuracy level 4 (4 and 8 bits) to fp32 rounding, for any row count, and the same for a row whatever else is in
the call."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nextn.calib.rewrite import apply_nbits, find_linears, quantize_rtn
from nextn.runtime import nbits_matmul, native

from kernel_sessions import (  # tests/runtime: shared by the kernels' tests
    assert_product_matches, assert_rows_are_independent, kernel_session, on_kernel)


def _nbits_graph(rng, k: int, n: int, block: int, bits: int, accuracy_level: int = 4) -> onnx.ModelProto:
    """x [.., K] -> one linear of N outputs, quantized as `nextn calibrate --scheme int4` writes it (apply_nbits)."""
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (lin,), _ = find_linears(model)
    apply_nbits(model, {"mm": (lin, quantize_rtn(w, block, bits))}, accuracy_level=accuracy_level)
    return model


def _on_kernel(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    return on_kernel(model, nbits_matmul.use_nbits_matmul)


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("k,n,block,bits", [(1024, 288, 64, 4), (256, 2048, 64, 8), (96, 40, 32, 4), (200, 33, 64, 8),
                                           (40, 17, 16, 4)])  # fmt: skip
def test_the_kernel_computes_onnxruntimes_matmulnbits(k, n, block, bits):
    # (1024, 288): issue 14's kv_a_proj; (256, 2048, 8 bits): the embedded model's head; (200, 33): a last block of
    # 8 rows and N not whole tiles of 16; (40, 17, 16): three and a half blocks
    rng = np.random.default_rng(k + n)
    model = _nbits_graph(rng, k, n, block, bits)
    rewritten, arrays = _on_kernel(model)
    assert [(m.domain, m.op_type) for m in rewritten.graph.node] == [(native.DOMAIN, nbits_matmul.OP_TYPE)]
    assert len(rewritten.graph.initializer) == 2 and set(arrays) == {t.name for t in rewritten.graph.initializer}
    # the same int8 activations and weights; sums in another order: fp32 rounding
    assert_product_matches(model, rewritten, k, rng, 2e-6)


@pytest.mark.usefixtures("needs_kernel")
def test_a_rows_output_does_not_depend_on_the_other_rows():
    rng = np.random.default_rng(1)
    assert_rows_are_independent(kernel_session(_on_kernel(_nbits_graph(rng, 256, 600, 64, 4))[0]), 256, rng)


def test_only_what_the_kernel_computes_as_the_op_is_rewritten():
    rng = np.random.default_rng(2)
    level0 = _nbits_graph(rng, 64, 16, 32, 4, accuracy_level=0)  # fp32 activations: another arithmetic
    odd = _nbits_graph(rng, 36, 16, 16, 4)  # K not a multiple of 8
    shared = _nbits_graph(rng, 64, 16, 32, 4)
    shared.graph.node.append(helper.make_node("Identity", [shared.graph.node[0].input[1]], ["b_copy"]))
    for model in (level0, odd, shared):
        rewritten, arrays = _on_kernel(model)
        assert not arrays and rewritten.graph.node[0].op_type == "MatMulNBits"
