"""MLA's absorbed attention in fewer ONNX nodes, for export (opset >= 23, with fused_rope).

Every ONNX node costs a kernel launch and often a copy, and the reference's absorbed form (model/reference.py)
puts the heads in a batch dimension: the query is transposed to [B, nh, S, R + D], the latent key unsqueezed
to [B, 1, T, R + D], the output transposed back, and each rotary is wrapped in Reshapes and a Gather: ~33
nodes a layer after ONNX Runtime's own fusions.
The latent key is shared by every head, so heads can be rows instead: one GEMM per sequence against the
key, no transposes, and the rope key rotated as it comes out of its projection:

    q [B, S, nh*(dn+D)] ─ Reshape [B*S, nh, 1, dn+D] ─ Split ─ q_nope ─ MatMul(W_UK [nh, dn, R]) ─ [B*S, nh, 1, R] ─┐
                                                         └─ q_pe [B*S, nh, 1, D] ─ RotaryEmbedding ─────────────── Concat
    q [B, S*nh, R+D] (Reshape) @ k^T, k = [c_kv; k_pe] [B, T, R+D] ─ * scale ─ Where(mask rows) ─ Softmax [B, S*nh, T]
      ─ @ c_kv [B, T, R] ─ Reshape [B*S, nh, 1, R] ─ MatMul(W_UV^T [nh, R, dv]) ─ Reshape [B, S, nh*dv] ─ o_proj

W_UK and W_UV^T broadcast over the B*S rows (each head's 1-row product, in one MatMul node); the query's
rotary takes [B*S, nh, 1, D] as RotaryEmbedding's own (batch, heads, sequence, D) layout with cos/sin as
[B*S, 1, D/2]. Those and the mask rows [B, S*nh, T] are the same expressions in every layer, computed once
after common-subexpression elimination. The arithmetic is the reference's absorbed form, the same products
in another order: the graphs are validated against the reference as every export is. Weights are not
changed, so artifacts exported with or without this form calibrate alike. Measured (BENCHMARKS.md): 7 nodes
fewer a layer after ONNX Runtime's fusions, ~3% of a step on the embedded model and ~6% on the 1 GB one
(with the fused norms); both steps are bound by the bytes they read more than by their node count.
"""

from __future__ import annotations

import contextlib
import types

import torch

from nextn.export.fused_rope import rope, rope_rows
from nextn.model.reference import MLA, LayerKV, _softmax


def _lean_forward(self: MLA, x, rotary, cos, sin, mask, past: LayerKV, absorbed: bool):
    """MLA.forward's signature and results (absorbed form); x [B, S, H], mask [B, 1, S, T] bool."""
    cfg = self.cfg
    b, s, _ = x.shape
    nh, dn, dr, dv, r = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                         cfg.v_head_dim, cfg.kv_lora_rank)  # fmt: skip
    q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
    q_nope, q_pe = q.view(b * s, nh, 1, dn + dr).split([dn, dr], dim=-1)  # [B*S, nh, 1, dn], [B*S, nh, 1, D]
    c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)  # [B, S, R], [B, S, D]
    new = LayerKV(self.kv_a_layernorm(c_kv), rope(k_pe, cos, sin))
    all_ckv = torch.cat([past.c_kv, new.c_kv], dim=1)  # [B, T, R]
    key = torch.cat([all_ckv, torch.cat([past.k_pe, new.k_pe], dim=1)], dim=-1)  # [B, T, R + D]

    w = self.kv_b_proj.weight.view(nh, dn + dv, r)
    w_uk, w_uv_t = w[:, :dn], w[:, dn:].transpose(-1, -2)  # [nh, dn, R], [nh, R, dv]
    cos_rows, sin_rows = cos.view(b * s, 1, -1), sin.view(b * s, 1, -1)  # [B*S, 1, D/2]: the same in every layer
    q_cat = torch.cat([q_nope @ w_uk, rope_rows(q_pe, cos_rows, sin_rows)], dim=-1).view(b, s * nh, r + dr)
    rows = mask[:, 0, :, None, :].expand(b, s, nh, mask.shape[-1]).reshape(b, s * nh, -1)  # [B, S*nh, T]
    p = _softmax((q_cat @ key.transpose(-1, -2)) * cfg.softmax_scale, rows)  # [B, S*nh, T]
    o = (p @ all_ckv).view(b * s, nh, 1, r) @ w_uv_t  # [B*S, nh, 1, dv]
    return self.o_proj(o.reshape(b, s, nh * dv)), new


@contextlib.contextmanager
def lean_attention(model: torch.nn.Module):
    """Inside, every MLA of an absorbed-form `model` runs `_lean_forward` (call it inside fused_rope, whose
    rope layout it relies on; a naive-form model is left as it is); on exit the modules are as before."""
    layers = [m for m in model.modules() if isinstance(m, MLA)] if getattr(model, "absorbed", False) else []
    try:
        for m in layers:
            m.forward = types.MethodType(_lean_forward, m)
        yield
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
