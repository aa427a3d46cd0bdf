"""Sibling products merged (runtime/merged_matmuls.py): one wider product and a Split, the same values."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nextn.calib.rewrite import pack_matmulnbits, quantize_rtn
from nextn.runtime.merged_matmuls import merge_sibling_matmuls

K = 128


def _model(nodes, weights: dict[str, np.ndarray], outputs: list[str]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              [numpy_helper.from_array(a, n) for n, a in weights.items()])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _merged(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return out, merge_sibling_matmuls(out, arrays.__getitem__)


def _outputs(model: onnx.ModelProto, x: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so).run(None, {"x": x})


def _nbits(name: str, n: int, block: int, bits: int, rng, out: str | None = None):
    w = quantize_rtn(rng.standard_normal((K, n)).astype(np.float32), block, bits)
    b, scales, zeros = pack_matmulnbits(w)
    node = helper.make_node("MatMulNBits", ["x", f"{name}_B", f"{name}_s", f"{name}_z"], [out or name],
                            domain="com.microsoft", name=name, K=K, N=n, bits=bits, block_size=block, accuracy_level=4)  # fmt: skip
    return node, {f"{name}_B": b, f"{name}_s": scales, f"{name}_z": zeros}


def test_fp32_siblings_become_one_product_and_a_split_and_a_router_stays_alone():
    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.standard_normal((K, n)).astype(np.float32) for i, n in enumerate((96, 64, 32, 8))}
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"m{i}") for i in range(4)]
    nodes.append(helper.make_node("Sigmoid", ["y3"], ["scores"]))  # w3 is a router: its output only feeds Sigmoid
    model = _model(nodes, weights, ["y0", "y1", "y2", "scores"])
    merged, groups = _merged(model)
    assert groups == 1
    assert [n.op_type for n in merged.graph.node] == ["MatMul", "Split", "MatMul", "Sigmoid"]
    x = rng.standard_normal((3, K)).astype(np.float32)
    for threads in (1, 2):
        for got, want in zip(_outputs(merged, x, threads), _outputs(model, x, threads)):
            assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_siblings_merge_exactly(bits):
    rng = np.random.default_rng(1)
    (a, wa), (b, wb) = _nbits("a", 96, 32, bits, rng), _nbits("b", 48, 32, bits, rng)
    other, wo = _nbits("c", 64, 64, bits, rng)  # another block size: not a sibling
    model = _model([a, b, other], wa | wb | wo, ["a", "b", "c"])
    merged, groups = _merged(model)
    assert groups == 1 and sorted(n.op_type for n in merged.graph.node) == ["MatMulNBits", "MatMulNBits", "Split"]
    assert sorted(t.name for t in merged.graph.initializer if t.name.startswith(("a_", "b_"))) == []  # replaced
    x = rng.standard_normal((4, K)).astype(np.float32)
    for threads in (1, 2):
        for got, want in zip(_outputs(merged, x, threads), _outputs(model, x, threads)):
            assert np.array_equal(got, want)


def test_a_graph_without_siblings_is_left_as_it_is():
    rng = np.random.default_rng(2)
    node, w = _nbits("a", 64, 32, 4, rng)
    model = _model([node], w, ["a"])
    merged, groups = _merged(model)
    assert groups == 0 and merged == model
