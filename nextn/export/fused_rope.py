"""Rotary embedding as one standard ONNX RotaryEmbedding node (opset 23), for export.

Traced as written, the reference's rotary is ~9 nodes per tensor (two strided Slices, four Muls, Sub, Add,
Concat), twice per attention layer. ONNX's RotaryEmbedding does it in one, but only in the "halves" form
(pairs (i, i + D/2)), while DeepSeek-V3 pairs (2i, 2i+1) (rope_interleave = true) and still writes the
result in halves layout. Both are met by permuting weights, exactly:

    q_b_proj rows of each head's rope part, kv_a_proj_with_mqa rows of k_pe:  [0, 2, 4, .., 1, 3, 5, ..]
    -> the projections emit x' = [x[0::2] | x[1::2]] -> RotaryEmbedding(interleaved=0) -> [x1 c - x2 s | x2 c + x1 s]

which is the reference's output, value for value (a permutation of weight rows changes no arithmetic).
The cache keeps the same k_pe. Inside `fused_rope`, the model's weights are permuted and its rotary runs
as the custom op nextn::rope; on exit both are restored.

    x [B, S, n, D] ─ Reshape [B, S, n*D] ─ RotaryEmbedding(cos, sin [B, S, D/2], num_heads=n) ─ Reshape [B, S, n, D]
    x [B, S, D]    ─ RotaryEmbedding(num_heads=1)           (the rope key in lean_attention.py's form: one node)
"""

from __future__ import annotations

import contextlib
import math

import torch

from nextn.model.reference import MLA

ROPE_OPSET = 23  # RotaryEmbedding is an opset-23 op; older opsets keep the traced form


def _rotate_halves(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The reference's rotation of x [..., D] (halves layout) by c/s broadcast against [..., D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


@torch.library.custom_op("nextn::rope", mutates_args=())
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, *heads, D] in halves layout (heads: none, n, or n x 1), cos/sin [B, S, D/2] -> rotated, halves
    layout (the reference's arithmetic)."""
    b, s, half = cos.shape
    return _rotate_halves(x, *(t.view(b, s, *[1] * (x.dim() - 3), half) for t in (cos, sin)))  # [B, S, 1.., D/2]


@rope.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)


@torch.library.custom_op("nextn::rope_rows", mutates_args=())
def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, n, 1, D] in halves layout (row N = b * S + s of a [B, S] batch), cos/sin [N, 1, D/2] -> rotated:
    RotaryEmbedding's own 4-D layout (batch, heads, sequence, D), so the graph needs no reshape around it."""
    return _rotate_halves(x, cos[:, None], sin[:, None])  # cos/sin [N, 1, 1, D/2]


@rope_rows.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)


def onnx_translations() -> dict:
    """torch.onnx `custom_translation_table` entries for nextn::rope and nextn::rope_rows."""
    from onnxscript import opset23 as op

    def translate(x, cos, sin):
        heads, d = [int(n) for n in x.shape[2:-1]], int(x.shape[-1])  # static: head dims and rope dims
        if not heads:  # [B, S, D]: one head, RotaryEmbedding takes it as it is
            return op.RotaryEmbedding(x, cos, sin, interleaved=0, num_heads=1)
        n = math.prod(heads)
        flat = op.Reshape(x, op.Constant(value_ints=[0, 0, n * d]))  # [B, S, n*D]
        y = op.RotaryEmbedding(flat, cos, sin, interleaved=0, num_heads=n)
        return op.Reshape(y, op.Constant(value_ints=[0, 0, *heads, d]))

    def translate_rows(x, cos, sin):
        return op.RotaryEmbedding(x, cos, sin, interleaved=0)  # 4-D input: heads from its shape

    return {torch.ops.nextn.rope.default: translate, torch.ops.nextn.rope_rows.default: translate_rows}


def _deinterleave(d: int) -> torch.Tensor:
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # [D]


@contextlib.contextmanager
def fused_rope(model: torch.nn.Module):
    """Inside, the rope projections of every attention layer emit the halves layout and the rotary runs as
    nextn::rope; on exit the weights and the rotary are as before (bit for bit)."""
    cfg, rotary = model.cfg, model.rotary
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        if cfg.rope_interleave:
            nh, dn, dr, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
            perm = _deinterleave(dr)
            head = torch.cat([torch.arange(dn), dn + perm])  # [dn + dr] rows of one head
            q_rows = torch.cat([h * (dn + dr) + head for h in range(nh)])  # [nh * (dn + dr)]
            kv_rows = torch.cat([torch.arange(r), r + perm])  # [R + dr]
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, MLA):
                        q = m.q_proj if cfg.q_lora_rank is None else m.q_b_proj
                        for w, rows in ((q.weight, q_rows), (m.kv_a_proj_with_mqa.weight, kv_rows)):
                            saved.append((w, w.detach().clone()))
                            w.copy_(w[rows])
        rotary.apply = rope  # [B, S, n, D] in, the same out: the signature of Rotary.apply
        yield
    finally:
        rotary.__dict__.pop("apply", None)
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)
