"""nextn's latent-attention kernel (runtime/latent_attention.py, kernels/latent_attention.c): the exported
MlaAttention function's values in one node, and the same for a query whatever else is in the call."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nextn.export.latent_attention import INPUTS, function_body
from nextn.runtime import latent_attention, native

from kernel_sessions import bf16_values, kernel_session, on_kernel  # tests/runtime: shared by the kernels' tests


def _attention_graph(rng, nh: int, dn: int, d: int, dv: int, r: int, bf16: bool = False) -> onnx.ModelProto:
    """One nextn.MlaAttention node as the export writes it, with its function."""
    w = (rng.standard_normal((nh * (dn + dv), r)) * 0.2).astype(np.float32)
    if bf16:
        w = bf16_values(w)
    attrs = dict(num_heads=nh, nope_dim=dn, rope_dim=d, v_dim=dv, latent_dim=r, scale=0.3)
    node = helper.make_node("MlaAttention", list(INPUTS), ["y"], domain="nextn", name="attn", **attrs)
    ins = [helper.make_tensor_value_info(n, TensorProto.BOOL if n == "mask" else TensorProto.FLOAT, None)
           for n in INPUTS[:-1]]  # fmt: skip
    graph = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "kv_b_proj")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("nextn", 1)])
    model.functions.append(function_body(**attrs, opset=23))
    return model


def _on_kernel(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    return on_kernel(model, latent_attention.use_latent_attention)


def _feed(rng, b: int, s: int, p: int, nh: int, dn: int, d: int, r: int, pad: bool = True) -> dict:
    mask = np.tril(np.ones((s, p + s), bool), k=p)[None].repeat(b, 0)  # [B, S, T] causal
    if pad and p:
        mask[0, :, 0] = False  # a padded past slot
    return {"q": rng.standard_normal((b, s, nh * (dn + d)), dtype=np.float32),
            "cos": rng.standard_normal((b, s, d // 2), dtype=np.float32),
            "sin": rng.standard_normal((b, s, d // 2), dtype=np.float32), "mask": mask,
            "past_c": rng.standard_normal((b, p, r), dtype=np.float32),
            "past_k": rng.standard_normal((b, p, d), dtype=np.float32),
            "new_c": rng.standard_normal((b, s, r), dtype=np.float32),
            "new_k": rng.standard_normal((b, s, d), dtype=np.float32)}  # fmt: skip


# (4, .., 64, 40) and (3, .., 64, 7): the scores' in-register form (R 64, D 16), the latter with odd row and entry
# counts; (16, .., 256, 300): four rows at a time; the others: score_dot one by one
SHAPES = [(4, 32, 16, 32, 64, 40), (3, 16, 16, 16, 64, 7), (16, 64, 32, 64, 256, 300), (3, 8, 6, 5, 37, 9),
          (2, 16, 8, 16, 24, 0)]


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("nh,dn,d,dv,r,p", SHAPES)
def test_the_kernel_computes_the_exported_function(nh, dn, d, dv, r, p):
    # (3, 8, 6, 5, 37): widths that leave tails after every 16-wide loop; (16, .., 300): enough work for the
    # kernel to split the heads into groups; p 0: a prefill without a past
    rng = np.random.default_rng(nh + r + p)
    model = _attention_graph(rng, nh, dn, d, dv, r)
    rewritten, stacks = _on_kernel(model)
    assert [n.op_type for n in rewritten.graph.node] == [latent_attention.OP_TYPE] and not rewritten.functions
    assert stacks["kv_b_proj"].shape == (nh, (dn + dv) * r)
    want, got = kernel_session(model), kernel_session(rewritten)
    for b, s in ((1, 1), (2, 3), (1, 5)):
        feed = _feed(rng, b, s, p, nh, dn, d, r)
        ref, out = want.run(None, feed)[0], got.run(None, feed)[0]
        assert out.shape == ref.shape == (b, s, nh * dv)
        assert np.abs(out - ref).max() < 2e-5 * np.abs(ref).max(), (b, s)


@pytest.mark.usefixtures("needs_kernel")
def test_a_fully_masked_query_attends_uniformly_as_the_reference_does():
    rng = np.random.default_rng(1)
    model = _attention_graph(rng, 4, 32, 16, 32, 64)
    feed = _feed(rng, 1, 2, 6, 4, 32, 16, 64)
    feed["mask"][0, 1] = False  # a padding query: every entry masked
    want, got = kernel_session(model).run(None, feed)[0], kernel_session(_on_kernel(model)[0]).run(None, feed)[0]
    assert np.abs(got - want).max() < 2e-5 * np.abs(want).max()


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("nh,dn,d,dv,r,p", SHAPES[:3])
def test_a_querys_output_does_not_depend_on_the_other_queries_nor_the_threads(nh, dn, d, dv, r, p):
    # A verify pass and a one-token step must agree bit for bit on the same query (greedy stays identical):
    # query s alone, against the new entries it sees, equals query s of a 4-query call.
    rng = np.random.default_rng(2)
    model = _on_kernel(_attention_graph(rng, nh, dn, d, dv, r))[0]
    one, two = kernel_session(model), kernel_session(model, threads=2)
    feed = _feed(rng, 2, 4, p, nh, dn, d, r)
    together = one.run(None, feed)[0]
    assert np.array_equal(two.run(None, feed)[0], together)
    for s in range(4):
        alone = dict(feed, q=feed["q"][:, s : s + 1], cos=feed["cos"][:, s : s + 1], sin=feed["sin"][:, s : s + 1],
                     mask=feed["mask"][:, s : s + 1])  # fmt: skip
        assert np.array_equal(one.run(None, alone)[0][:, 0], together[:, s]), s


@pytest.mark.usefixtures("needs_kernel")
def test_bf16_weights_are_read_as_bf16_and_give_the_same_output():
    rng = np.random.default_rng(3)
    model = _attention_graph(rng, 4, 32, 16, 32, 64, bf16=True)
    rewritten, stacks = _on_kernel(model)
    assert rewritten.graph.node[0].op_type == latent_attention.OP_TYPE_BF16 and stacks["kv_b_proj"].dtype == np.uint16
    feed = _feed(rng, 2, 3, 10, 4, 32, 16, 64)
    want = kernel_session(model).run(None, feed)[0]
    assert np.abs(kernel_session(rewritten).run(None, feed)[0] - want).max() < 2e-5 * np.abs(want).max()


@pytest.mark.usefixtures("needs_kernel")
def test_a_weight_another_node_reads_keeps_the_function():
    rng = np.random.default_rng(4)
    model = _attention_graph(rng, 2, 16, 8, 16, 24)
    model.graph.node.append(helper.make_node("Identity", ["kv_b_proj"], ["w_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("w_copy", TensorProto.FLOAT, None))
    rewritten, stacks = _on_kernel(model)
    assert not stacks and rewritten.graph.node[0].op_type == "MlaAttention" and len(rewritten.functions) == 1
    # the function still runs in a session that registers nextn's library (its "nextn" domain) for other nodes
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(native.kernel_library()))
    with_library = ort.InferenceSession(rewritten.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = _feed(rng, 1, 2, 5, 2, 16, 8, 24)
    assert np.array_equal(with_library.run(None, feed)[0], kernel_session(model).run(None, feed)[0])


def test_a_node_off_the_kernels_contract_keeps_the_function():
    model = _attention_graph(np.random.default_rng(6), 2, 16, 8, 16, 24)
    for attr in model.graph.node[0].attribute:
        if attr.name == "latent_dim":
            attr.i = 25  # kv_b_proj is [.., 24]
    rewritten, stacks = _on_kernel(model)
    assert not stacks and rewritten.graph.node[0].op_type == "MlaAttention" and len(rewritten.functions) == 1
