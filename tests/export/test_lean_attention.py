"""The lean absorbed attention and the fused residual norms: the reference's values in fewer nodes."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from nextn.export.exporter import ExportForms
from nextn.export.optimize import fuse_skip_norms
from nextn.model.reference import DeepseekV3
from nextn.testing import tiny_config


@pytest.mark.parametrize("interleave", [True, False])
def test_lean_attention_equals_reference_with_past_padding_and_mtp(interleave):
    # the past and the new entries are attended separately (no copy of the cache): a padded past slot and a
    # prefill without a past are the edges
    cfg = tiny_config(rope_interleave=interleave)
    model = DeepseekV3(cfg, num_mtp=1, absorbed=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    ids, pos = torch.randint(0, cfg.vocab_size, (2, 5)), torch.arange(5)[None].expand(2, 5)
    ids2, pos2 = torch.randint(0, cfg.vocab_size, (2, 3)), torch.arange(5, 8)[None].expand(2, 3)
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[0, 1] = 0  # a padded slot in the past of row 0
    with torch.no_grad():
        first = model(ids, pos)
        past = first.new_kv
        want = model(ids2, pos2, past, mask)
        want_mtp = model.mtp_forward(0, ids2, want.hidden, pos2, None, None)
        forward = type(model.model.layers[0].self_attn).forward
        with ExportForms("fused", 23)(model):
            assert model.model.layers[0].self_attn.forward.__func__ is not forward  # the lean form is in
            got_first = model(ids, pos)  # no past
            got = model(ids2, pos2, past, mask)
            got_mtp = model.mtp_forward(0, ids2, want.hidden, pos2, None, None)
        assert "forward" not in model.model.layers[0].self_attn.__dict__  # restored
    torch.testing.assert_close(got_first.logits, first.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_mtp.logits, want_mtp.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(got.new_kv, want.new_kv):  # the cache entries are the reference's
        torch.testing.assert_close(a.c_kv, b.c_kv, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.k_pe, b.k_pe, rtol=1e-5, atol=1e-6)


def test_naive_models_keep_their_attention():
    model = DeepseekV3(tiny_config(), num_mtp=0, absorbed=False)
    with ExportForms("fused", 23)(model):
        assert "forward" not in model.model.layers[0].self_attn.__dict__


def _residual_norm_graph(norm_is_output: bool) -> onnx.ModelProto:
    """a + b -> RMSNormalization -> MatMul; the sum also feeds the next residual add (as in a decoder)."""
    x = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", 8]) for n in ("a", "b")]
    inits = [helper.make_tensor("g", TensorProto.FLOAT, [8], np.linspace(0.5, 1.5, 8).tolist()),
             helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.eye(8).ravel().tolist())]  # fmt: skip
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"]),
             helper.make_node("RMSNormalization", ["sum", "g"], ["normed"], axis=-1, epsilon=1e-6, stash_type=1),
             helper.make_node("MatMul", ["normed", "w"], ["y"]),
             helper.make_node("Add", ["sum", "y"], ["out"])]  # fmt: skip
    outs = ["out", "normed"] if norm_is_output else ["out"]
    graph = helper.make_graph(nodes, "g", x, [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs],
                              inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


@pytest.mark.parametrize("norm_is_output", [False, True])
def test_fuse_skip_norms_same_values_and_output_names(norm_is_output):
    proto = _residual_norm_graph(norm_is_output)
    model = ir.serde.deserialize_model(proto)
    assert fuse_skip_norms(model) == 1
    fused = ir.serde.serialize_model(model)
    ops = [n.op_type for n in fused.graph.node]
    assert ops == ["SkipSimplifiedLayerNormalization", "MatMul", "Add"]
    assert [o.name for o in fused.graph.output] == [o.name for o in proto.graph.output]
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((2, 3, 8), dtype=np.float32) for n in ("a", "b")}
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
           for m in (proto, fused)]  # fmt: skip
    for want, got in zip(*run):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_fuse_skip_norms_leaves_broadcasting_adds():
    proto = _residual_norm_graph(False)
    proto.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 1  # b [b, 1, 8] broadcasts over s
    model = ir.serde.deserialize_model(proto)
    assert fuse_skip_norms(model) == 0


def test_exported_graphs_take_the_fused_forms(both_moe_forms):
    layers = tiny_config().num_hidden_layers
    for moe, art in both_moe_forms.items():
        for name, norms in (("trunk", 2 * layers), ("mtp_0", 2)):
            model = onnx.load(str(art / f"{name}.onnx"), load_external_data=False)
            nodes = model.graph.node
            ops = [n.op_type for n in nodes]
            # every residual add + norm of the decoder blocks, where the graph takes ONNX Runtime's ops
            assert ops.count("SkipSimplifiedLayerNormalization") == (norms if moe == "fused" else 0)
            if moe == "fused":  # the attention is one nextn.MlaAttention a layer, its body an ONNX function
                # (latent_attention.py); only the key's rotary stays outside it
                assert ops.count("MlaAttention") == norms // 2 and "Transpose" not in ops
                assert [(f.domain, f.name) for f in model.functions] == [("nextn", "MlaAttention")]
                assert ops.count("RotaryEmbedding") == (layers if name == "trunk" else 1)
            else:  # standard ops only: the lean form, two rotaries a layer
                assert ops.count("RotaryEmbedding") == 2 * (layers if name == "trunk" else 1) and not model.functions


@pytest.fixture(scope="module")
def both_moe_forms(tiny_moe_forms):
    return {form: art for form, (_, art) in tiny_moe_forms.items()}
