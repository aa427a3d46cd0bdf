"""nextn's bf16-weight product kernel (runtime/bf16_matmul.py, kernels/bf16_matmul.c): ONNX Runtime's MatMul over
weights that are bf16 values, read as bf16, for any row count, and the same for a row whatever else is in the call."""

from unittest import mock

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nextn.runtime import bf16_matmul, native
from nextn.runtime.engines import open_engines

from kernel_sessions import (  # tests/runtime: shared by the kernels' tests
    assert_drafting_is_lossless, assert_product_matches, assert_rows_are_independent, bf16_values, kernel_session,
    on_kernel, trunk_feed)


def _bf16_values(rng, shape) -> np.ndarray:
    return bf16_values(rng.standard_normal(shape).astype(np.float32) * 0.1)


def _matmul_graph(w: np.ndarray, then: str | None = None) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if then is None else "p"], name="mm")]
    if then is not None:
        nodes.append(helper.make_node(then, ["p"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _on_kernel(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    return on_kernel(model, bf16_matmul.use_bf16_matmul)


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("k,n", [(256, 2048), (96, 176), (40, 300), (600, 520), (7, 5)])
def test_the_kernel_computes_onnxruntimes_matmul(k, n):
    # (256, 2048): the embedded model's head, 21 column blocks and a last one of 32; (96, 176): a block, then one of
    # 80 (a 64- and a 16-wide chunk); (40, 300), (600, 520): a narrower last block, with a tail of columns past the
    # chunks; (7, 5): tails only
    rng = np.random.default_rng(k + n)
    model = _matmul_graph(_bf16_values(rng, (k, n)))
    rewritten, blocks = _on_kernel(model)
    assert [(m.domain, m.op_type) for m in rewritten.graph.node] == [(native.DOMAIN, bf16_matmul.OP_TYPE)]
    assert blocks["w"].dtype == np.uint16 and blocks["w"].shape == (k * n,)
    assert_product_matches(model, rewritten, k, rng, 1e-5)


@pytest.mark.usefixtures("needs_kernel")
def test_the_blocks_width_changes_no_output():
    # 96 columns (the default) and 128 (what it replaced): each output is a sum over K in order either way
    rng = np.random.default_rng(4)
    model = _matmul_graph(_bf16_values(rng, (256, 600)))
    sessions = []
    for block in (96, 128):
        with mock.patch.object(bf16_matmul, "BLOCK", block):
            rewritten = _on_kernel(model)[0]
        assert {a.name: a.i for a in rewritten.graph.node[0].attribute} == {"n": 600, "block": block}
        sessions.append(kernel_session(rewritten, threads=2))
    for rows in (1, 4, 70):
        x = rng.standard_normal((rows, 256)).astype(np.float32)
        assert np.array_equal(*(s.run(None, {"x": x})[0] for s in sessions)), rows


@pytest.mark.usefixtures("needs_kernel")
def test_a_rows_output_does_not_depend_on_the_other_rows():
    rng = np.random.default_rng(1)
    assert_rows_are_independent(kernel_session(_on_kernel(_matmul_graph(_bf16_values(rng, (256, 600))))[0]), 256, rng)


def test_only_bf16_weights_no_other_node_reads_are_rewritten():
    rng = np.random.default_rng(2)
    fp32 = _matmul_graph(rng.standard_normal((16, 8)).astype(np.float32))  # not bf16 values
    router = _matmul_graph(_bf16_values(rng, (16, 8)), then="Sigmoid")  # a router's scores pick experts
    shared = _matmul_graph(_bf16_values(rng, (16, 8)))
    shared.graph.node.append(helper.make_node("Identity", ["w"], ["w_copy"]))
    for model in (fp32, router, shared):
        rewritten, blocks = _on_kernel(model)
        assert not blocks and rewritten.graph.node[0].op_type == "MatMul"
    w = _bf16_values(rng, (16, 8))
    x_times_x = _matmul_graph(w)
    x_times_x.graph.node[0].input[1] = "x"  # a product of two activations: nothing to read as bf16
    assert not _on_kernel(x_times_x)[1]


@pytest.mark.usefixtures("needs_kernel")
def test_a_bf16_checkpoint_decodes_on_the_kernel_as_without_it(tmp_path):
    """A bf16 checkpoint exported in fp32: its trunk's products on the kernel give the logits ONNX Runtime's
    MatMul gives, and drafting stays lossless (greedy tokens at K = 2 equal K = 0's)."""
    from nextn.export.exporter import ExportOptions, export_checkpoint
    from nextn.testing import tiny_config, write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path / "ckpt", tiny_config(), weights="bfloat16")
    artifact = tmp_path / "fp32"
    export_checkpoint(ckpt, artifact, ExportOptions())
    kernel = open_engines(artifact, prepack=True)
    with mock.patch.object(bf16_matmul, "use_bf16_matmul", lambda model, array: {}):
        matmul = open_engines(artifact, prepack=True)
    assert kernel["trunk"].bf16_matmuls > 0 and matmul["trunk"].bf16_matmuls == 0
    cfg = kernel.manifest["config"]
    rng = np.random.default_rng(3)
    for s in (1, 4):
        feed = trunk_feed(cfg, rng, s)
        for a, b in zip(matmul["trunk"].run(feed), kernel["trunk"].run(feed)):
            assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(a).max()))
    kernel.close()
    matmul.close()
    assert_drafting_is_lossless(artifact, rng)
