"""The fused MoE form (export --moe fused) against the reference's per-expert form."""

import numpy as np
import onnx
import pytest
import torch

from nextn.errors import NextnError
from nextn.export.fused_moe import fused_experts, fused_moe, resolve_moe_form
from nextn.export.validate import make_session
from nextn.model.reference import DeepseekV3, MoE
from nextn.testing import tiny_config


def _random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = DeepseekV3(cfg, absorbed=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_fused_op_equals_the_reference_moe():
    cfg = tiny_config()
    model = _random_model(cfg)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    x = torch.randn(2, 9, cfg.hidden_size)
    with torch.no_grad():
        want = moe(x)
        with fused_experts(model):
            got = moe(x)  # the swapped forward: nextn::fused_moe eagerly, on the stacked weights
            assert moe.fused_w13.shape == (cfg.n_routed_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and the swap is undone: no forward override, no extra buffers, same state
    assert "forward" not in moe.__dict__ and not any("fused" in n for n, _ in model.named_buffers())
    torch.testing.assert_close(moe(x), want, rtol=0, atol=0)


def test_fused_op_interleaves_gate_and_up():
    """w13 rows alternate gate_j, up_j: swapping the two halves must change the result."""
    cfg = tiny_config()
    e, i, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, h, generator=g)
    wt, bias = torch.randn(h, e, generator=g), torch.zeros(e)
    gate, up, down = (torch.randn(e, i, h, generator=g) * 0.1, torch.randn(e, i, h, generator=g) * 0.1,
                      torch.randn(e, h, i, generator=g) * 0.1)  # fmt: skip
    w13 = torch.stack([gate, up], dim=2).flatten(1, 2)
    y = fused_moe(x, wt, bias, w13, down, 2, 4, 2, 2.5)
    want = torch.zeros_like(x)
    from nextn.model.reference import route

    ids, w = route(x, wt.t(), bias, 2, 4, 2, True, 2.5)
    for t in range(5):
        for j in range(2):
            ex = ids[t, j]
            a = torch.nn.functional.silu(gate[ex] @ x[t]) * (up[ex] @ x[t])
            want[t] += w[t, j] * (down[ex] @ a)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_form_resolution():
    assert resolve_moe_form("auto", tiny_config()) == "fused"
    assert resolve_moe_form("sparse", tiny_config()) == "sparse"
    plain = tiny_config(norm_topk_prob=False)
    assert resolve_moe_form("auto", plain) == "sparse"  # MoE's softmax would renormalize the weights
    with pytest.raises(NextnError, match="--moe fused: .*norm_topk_prob"):
        resolve_moe_form("fused", plain)
    with pytest.raises(NextnError, match="--moe dense"):
        resolve_moe_form("dense", plain)
    # top_k larger than the experts topk_group groups hold: MoEGroupRouter refuses it, the reference does not
    crowded = tiny_config(num_experts_per_tok=6, n_group=4, topk_group=2)  # 2 groups x 2 experts < 6
    assert resolve_moe_form("auto", crowded) == "sparse"
    with pytest.raises(NextnError, match="--moe fused: top 6 experts"):
        resolve_moe_form("fused", crowded)
    # bf16 router_probs would move the routing weights by ~1-2%: auto keeps bf16 exports per expert
    assert resolve_moe_form("auto", tiny_config(), "bfloat16") == "sparse"
    assert resolve_moe_form("auto", tiny_config(), "float16") == "fused"


def test_one_group_exports_fused_and_validates(tiny_exports):
    """n_group = 1 means no group limit whatever topk_group says (the reference skips it); MoEGroupRouter
    refused topk_group > n_group at run time before the fix. (tiny_exports: a checkpoint of
    tiny_config(n_group=1, topk_group=2, num_nextn_predict_layers=0) exported with the default options.)"""
    manifests, _ = tiny_exports
    m = manifests["one_group"]  # validation runs the fused graph
    assert (m["config"]["n_group"], m["config"]["topk_group"]) == (1, 2)
    assert m["moe"] == "fused" and all(r["max_abs"] <= r["bound"] for r in m["validation"])


def test_fused_and_sparse_graphs(tiny_moe_forms):
    for form, (manifest, art) in tiny_moe_forms.items():
        assert manifest["moe"] == form
        for g in ("trunk", "mtp_0"):
            ops = {(n.domain, n.op_type) for n in onnx.load(str(art / f"{g}.onnx"), load_external_data=False).graph.node}
            fused = {("com.microsoft", "MoE"), ("com.microsoft", "MoEGroupRouter")}
            if form == "fused":
                assert fused <= ops and ("", "NonZero") not in ops
            else:
                assert not {d for d, _ in ops} - {"", "ai.onnx"}  # standard ONNX only (other runtimes)


@pytest.mark.parametrize("b,s,p", [(1, 1, 6), (3, 4, 5), (2, 9, 0)])
def test_fused_graph_equals_sparse_graph(tiny_moe_forms, b, s, p):
    (mf, fused), (_, sparse) = tiny_moe_forms["fused"], tiny_moe_forms["sparse"]
    cfg = mf["config"]
    rng = np.random.default_rng(b * 100 + s)
    feed = {"input_ids": rng.integers(0, cfg["vocab_size"], (b, s)), "position_ids": np.tile(np.arange(p, p + s), (b, 1)),
            "attention_mask": np.ones((b, p + s), np.int64)}  # fmt: skip
    for i in range(cfg["num_hidden_layers"]):
        feed[f"past.{i}.c_kv"] = rng.standard_normal((b, p, cfg["kv_lora_rank"])).astype(np.float32)
        feed[f"past.{i}.k_pe"] = rng.standard_normal((b, p, cfg["qk_rope_head_dim"])).astype(np.float32)
    a = make_session(fused / "trunk.onnx").run(None, feed)
    c = make_session(sparse / "trunk.onnx").run(None, feed)
    for x, y in zip(a, c):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5)
