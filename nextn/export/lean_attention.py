"""MLA's absorbed attention in fewer ONNX nodes, for export (opset >= 23, with fused_rope).

Every ONNX node costs a kernel launch and often a copy, and the reference's absorbed form (model/reference.py)
puts the heads in a batch dimension: the query is transposed to [B, nh, S, R + D], the latent key unsqueezed
to [B, 1, T, R + D], the output transposed back, each rotary is wrapped in Reshapes and a Gather, and every
step copies the whole cache twice (past + new, then [c_kv; k_pe]). The latent key is shared by every head,
so heads can be rows instead: one GEMM per sequence against the key, no transposes; and the past and the
new entries are attended as they are, side by side, so no step copies the cache:

    q [B, S, nh*(dn+D)] ─ Reshape [B*S, nh, 1, dn+D] ─ Split ─ q_nope @ W_UK [nh, dn, R] ─ Reshape ─ q_lat [B, S*nh, R]
                                                          └─ q_pe ─ RotaryEmbedding ─ Reshape ─ q_rot [B, S*nh, D]
    scores = [q_lat @ past.c_kv^T + q_rot @ past.k_pe^T | q_lat @ new.c_kv^T + q_rot @ new.k_pe^T] * scale  [B, S*nh, T]
    p = Softmax(Where(mask rows, scores)) ─ Split [P | S] ─ p_past @ past.c_kv + p_new @ new.c_kv  [B, S*nh, R]
      ─ Reshape [B*S, nh, 1, R] @ W_UV^T [nh, R, dv] ─ Reshape [B, S, nh*dv] ─ o_proj

W_UK and W_UV^T broadcast over the B*S rows (each head's 1-row product, in one MatMul node); the query's
rotary takes [B*S, nh, 1, D] as RotaryEmbedding's own (batch, heads, sequence, D) layout with cos/sin as
[B*S, 1, D/2], and the key's rotary its 3-D one. Those and the mask rows [B, S*nh, T] are the same
expressions in every layer, computed once after common-subexpression elimination. The arithmetic is the
reference's absorbed form, the same products in another order: the graphs are validated against the
reference as every export is. Weights are not changed, so artifacts exported with or without this form
calibrate alike. Measured (BENCHMARKS.md, with the fused norms): a step of the embedded model 2% cheaper
after a past of 100 and 16% after 1024 (the copies grew with the past), 4-5% on the 1 GB model after 64.
"""

from __future__ import annotations

import contextlib
import types

import torch

from nextn.export.fused_rope import rope
from nextn.export.latent_attention import absorbed_attention, latent_attention
from nextn.model.reference import MLA, LayerKV, query_rows


def _lean_forward(self: MLA, x, rotary, cos, sin, mask, past: LayerKV, absorbed: bool, rows=None):
    """MLA.forward's signature and results (absorbed form); x [B, S, H], mask [B, 1, S, T] bool; rows [B, N]:
    only those rows query (every row's cache entry is computed)."""
    cfg = self.cfg
    nh, dn, dr, dv, r = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                         cfg.v_head_dim, cfg.kv_lora_rank)  # fmt: skip
    c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)  # [B, S, R], [B, S, D]
    new = LayerKV(self.kv_a_layernorm(c_kv), rope(k_pe, cos, sin))
    x, cos, sin, mask = query_rows(rows, x, cos, sin, mask)  # only the query rows from here on
    q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
    one_node = self.__dict__.get("one_node") and q.dtype == torch.float32  # latent_attention.py: one node, same sums
    attend = latent_attention if one_node else absorbed_attention
    o = attend(q, cos, sin, mask[:, 0], past.c_kv, past.k_pe, new.c_kv, new.k_pe, self.kv_b_proj.weight, nh, dn, dv,
               float(cfg.softmax_scale))  # fmt: skip # [B, S, nh*dv]
    return self.o_proj(o), new


@contextlib.contextmanager
def lean_attention(model: torch.nn.Module, one_node: bool = False):
    """Inside, every MLA of an absorbed-form `model` runs `_lean_forward` (call it inside fused_rope, whose
    rope layout it relies on; a naive-form model is left as it is); on exit the modules are as before.
    `one_node`: fp32 layers trace their attention as nextn::latent_attention (latent_attention.py)."""
    layers = [m for m in model.modules() if isinstance(m, MLA)] if getattr(model, "absorbed", False) else []
    try:
        for m in layers:
            m.forward = types.MethodType(_lean_forward, m)
            m.one_node = one_node
        yield
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("one_node", None)
