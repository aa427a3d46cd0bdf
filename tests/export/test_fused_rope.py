"""Rotary as one ONNX RotaryEmbedding (opset 23): permuted weights, same values as the reference."""

import onnx
import pytest
import torch

from nextn.export.fused_rope import fused_rope
from nextn.model.reference import DeepseekV3
from nextn.testing import tiny_config


@pytest.mark.parametrize("interleave", [True, False])
def test_fused_rope_model_equals_reference_and_is_restored(interleave):
    cfg = tiny_config(rope_interleave=interleave)
    torch.manual_seed(0)
    model = DeepseekV3(cfg, num_mtp=1, absorbed=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    pos = torch.arange(5)[None].expand(2, 5)
    with torch.no_grad():
        want = model(ids, pos)
        with fused_rope(model):
            got = model(ids, pos)  # permuted projections + halves rotary
            changed = any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
        after = model(ids, pos)
    assert changed == interleave  # only interleaved checkpoints need the permutation
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(got.new_kv, want.new_kv):  # the cache holds the same k_pe
        torch.testing.assert_close(a.k_pe, b.k_pe, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored bit for bit
    assert "apply" not in model.rotary.__dict__
    torch.testing.assert_close(after.logits, want.logits, rtol=0, atol=0)


def test_graphs_use_rotary_embedding_at_opset_23_only(both_forms_opsets):
    for opset, art in both_forms_opsets.items():
        model = onnx.load(str(art / "trunk.onnx"), load_external_data=False)
        ops = [n.op_type for n in model.graph.node] + [n.op_type for f in model.functions for n in f.node]
        layers = tiny_config().num_hidden_layers
        # q and k per layer; at opset 23 the query's is in the MlaAttention function, once for every layer
        assert ops.count("RotaryEmbedding") == (layers + 1 if opset == 23 else 0)


@pytest.fixture(scope="module")
def both_forms_opsets(tiny_exports, tiny_moe_forms):
    manifests, root = tiny_exports  # the tiny checkpoint's trunk at opset 18, validated against the reference
    manifest, at_23 = tiny_moe_forms["fused"]
    assert manifests["opset18"]["opset"] == 18 and manifest["opset"] == 23
    return {18: root / "opset18", 23: at_23}
