"""MLA's absorbed attention as one node a layer: `nextn.MlaAttention`, an ONNX function, for export.

lean_attention.py's form is ~35 ONNX Runtime nodes a layer (the per-head products with W_UK and W_UV, the
query's rotary, two score products per cache part, mask, softmax, reshapes). Where the graph already needs ONNX
Runtime (the fused MoE) and is fp32, that whole stretch is traced as the custom op nextn::latent_attention and
exported as one node

    nextn.MlaAttention(q [B, S, nh (dn + D)], cos, sin [B, S, D/2], mask [B, S, T] bool,
                       past_c [B, P, R], past_k [B, P, D], new_c [B, N, R], new_k [B, N, D],
                       kv_b_proj [nh (dn + dv), R])  -> [B, S, nh dv]      (then o_proj)

whose body, a model-local ONNX function (`attach_function`), is lean_attention.py's arithmetic in standard ops:
any runtime that takes ONNX functions runs the artifact as it is (ONNX Runtime inlines it when a session
opens), and the graphs are validated against the reference in that form like every export. nextn's runtime
replaces the node with its CPU kernel where it can build it (runtime/latent_attention.py,
runtime/kernels/latent_attention.c): one node a layer instead of ~35.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from nextn.export.fused_rope import rope_rows
from nextn.model.reference import _softmax

DOMAIN = "nextn"
OP_TYPE = "MlaAttention"
ATTRIBUTES = ("num_heads", "nope_dim", "rope_dim", "v_dim", "latent_dim")  # ints; and scale (float)
INPUTS = ("q", "cos", "sin", "mask", "past_c", "past_k", "new_c", "new_k", "kv_b_proj")


def absorbed_attention(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, past_c: torch.Tensor,
                       past_k: torch.Tensor, new_c: torch.Tensor, new_k: torch.Tensor, w: torch.Tensor, heads: int,
                       nope: int, v: int, scale: float) -> torch.Tensor:  # fmt: skip
    """MLA's absorbed attention from the query on, heads as rows (lean_attention.py's form; the shapes of the
    module docstring): traced as it is for the lean form, run eagerly by nextn::latent_attention."""
    b, s, _ = q.shape
    r, d = w.shape[-1], new_k.shape[-1]
    q_nope, q_pe = q.view(b * s, heads, 1, nope + d).split([nope, d], dim=-1)  # [B*S, nh, 1, dn], [.., D]
    w3 = w.view(heads, nope + v, r)
    w_uk, w_uv_t = w3[:, :nope], w3[:, nope:].transpose(-1, -2)  # [nh, dn, R], [nh, R, dv]
    cos_rows, sin_rows = cos.view(b * s, 1, -1), sin.view(b * s, 1, -1)  # [B*S, 1, D/2]: the same in every layer
    q_lat = (q_nope @ w_uk).view(b, s * heads, r)  # [B, S*nh, R]
    q_rot = rope_rows(q_pe, cos_rows, sin_rows).view(b, s * heads, d)  # [B, S*nh, D]

    def scores(c, k):  # [B, S*nh, len]: against the cache as it is, never copied
        return (q_lat @ c.transpose(-1, -2)) * scale + (q_rot @ k.transpose(-1, -2)) * scale

    rows = mask[:, :, None, :].expand(b, s, heads, mask.shape[-1]).reshape(b, s * heads, -1)  # [B, S*nh, T]
    p = _softmax(torch.cat([scores(past_c, past_k), scores(new_c, new_k)], dim=-1), rows)
    p_past, p_new = p.split([past_c.shape[1], new_c.shape[1]], dim=-1)
    o = (p_past @ past_c + p_new @ new_c).view(b * s, heads, 1, r) @ w_uv_t  # [B*S, nh, 1, dv]
    return o.reshape(b, s, heads * v)


@torch.library.custom_op("nextn::latent_attention", mutates_args=())
def latent_attention(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, past_c: torch.Tensor,
                     past_k: torch.Tensor, new_c: torch.Tensor, new_k: torch.Tensor, w: torch.Tensor, heads: int,
                     nope: int, v: int, scale: float) -> torch.Tensor:  # fmt: skip
    """absorbed_attention as one op, which the export writes as one MlaAttention node."""
    return absorbed_attention(q, cos, sin, mask, past_c, past_k, new_c, new_k, w, heads, nope, v, scale)


@latent_attention.register_fake
def _(q, cos, sin, mask, past_c, past_k, new_c, new_k, w, heads, nope, v, scale):
    return q.new_empty((q.shape[0], q.shape[1], heads * v))


def onnx_translations() -> dict:
    """torch.onnx `custom_translation_table` entry for nextn::latent_attention: one nextn.MlaAttention node."""
    import onnxscript
    from onnx.defs import OpSchema

    P = OpSchema.FormalParameter
    schema = OpSchema(OP_TYPE, DOMAIN, 1, inputs=[P(n, "B" if n == "mask" else "T") for n in INPUTS],
                      outputs=[P("output", "T")], type_constraints=[("T", ["tensor(float)"], ""),
                                                                     ("B", ["tensor(bool)"], "")],
                      attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT) for a in ATTRIBUTES]
                      + [OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT)])  # fmt: skip
    op = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), OP_TYPE, schema)

    def translate(q, cos, sin, mask, past_c, past_k, new_c, new_k, w, heads: int, nope: int, v: int, scale: float):
        return op(q, cos, sin, mask, past_c, past_k, new_c, new_k, w, num_heads=heads, nope_dim=nope,
                  rope_dim=int(new_k.shape[-1]), v_dim=v, latent_dim=int(w.shape[-1]), scale=scale)  # fmt: skip

    return {torch.ops.nextn.latent_attention.default: translate}


def attach_function(model: onnx.ModelProto) -> bool:
    """Give `model` the ONNX function its MlaAttention nodes call (every node of a graph has the same
    attributes: one model's layers); False where it has none."""
    nodes = [n for n in model.graph.node if (n.domain, n.op_type) == (DOMAIN, OP_TYPE)]
    if not nodes:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert all({a.name: helper.get_attribute_value(a) for a in n.attribute} == attrs for n in nodes), "mixed layers"
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    model.functions.append(function_body(**attrs, opset=opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return True


def function_body(num_heads: int, nope_dim: int, rope_dim: int, v_dim: int, latent_dim: int, scale: float,
                  opset: int) -> onnx.FunctionProto:  # fmt: skip
    """nextn::latent_attention's arithmetic in standard ONNX ops (opset >= 23: RotaryEmbedding)."""
    nh, dn, d, dv, r = num_heads, nope_dim, rope_dim, v_dim, latent_dim
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], n_out: int = 1, **attrs):
        outs = [f"{op.lower()}_{len(nodes)}_{i}" for i in range(n_out)]
        nodes.append(helper.make_node(op, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def ints(*values: int) -> str:
        return node("Constant", [], value_ints=list(values))

    b, bs = node("Shape", ["q"], end=1), node("Shape", ["q"], end=2)  # [B], [B, S]
    q_nope, q_pe = node("Split", [node("Reshape", ["q", ints(-1, nh, 1, dn + d)]), ints(dn, d)], 2, axis=-1)
    w_uk, w_uv = node("Split", [node("Reshape", ["kv_b_proj", ints(nh, dn + dv, r)]), ints(dn, dv)], 2, axis=1)
    q_lat = node("Reshape", [node("MatMul", [q_nope, w_uk]), node("Concat", [b, ints(-1, r)], axis=0)])
    cos, sin = (node("Reshape", [t, ints(-1, 1, d // 2)]) for t in ("cos", "sin"))  # [B*S, 1, D/2]
    q_rot = node("Reshape", [node("RotaryEmbedding", [q_pe, cos, sin], interleaved=0),
                             node("Concat", [b, ints(-1, d)], axis=0)])  # fmt: skip # [B, S*nh, D]
    scale_c = node("Constant", [], value=helper.make_tensor("scale", onnx.TensorProto.FLOAT, [], [scale]))

    def scores(c: str, k: str) -> str:  # [B, S*nh, len]
        lat = node("MatMul", [q_lat, node("Transpose", [c], perm=[0, 2, 1])])
        rot = node("MatMul", [q_rot, node("Transpose", [k], perm=[0, 2, 1])])
        return node("Add", [node("Mul", [lat, scale_c]), node("Mul", [rot, scale_c])])

    total = node("Shape", ["mask"], start=2)  # [T]
    rows = node("Reshape", [node("Expand", [node("Unsqueeze", ["mask", ints(2)]), ints(1, 1, nh, 1)]),
                            node("Concat", [b, ints(-1), total], axis=0)])  # fmt: skip # [B, S*nh, T]
    lowest = node("Constant", [], value=helper.make_tensor("lowest", onnx.TensorProto.FLOAT, [],
                                                           [float(np.finfo(np.float32).min)]))  # fmt: skip
    cat = node("Concat", [scores("past_c", "past_k"), scores("new_c", "new_k")], axis=-1)
    p = node("Softmax", [node("Where", [rows, cat, lowest])], axis=-1)
    sizes = node("Concat", [node("Shape", ["past_c"], start=1, end=2), node("Shape", ["new_c"], start=1, end=2)],
                 axis=0)  # fmt: skip
    p_past, p_new = node("Split", [p, sizes], 2, axis=-1)
    o_lat = node("Add", [node("MatMul", [p_past, "past_c"]), node("MatMul", [p_new, "new_c"])])  # [B, S*nh, R]
    o = node("MatMul", [node("Reshape", [o_lat, ints(-1, nh, 1, r)]), node("Transpose", [w_uv], perm=[0, 2, 1])])
    node("Reshape", [o, node("Concat", [bs, ints(nh * dv)], axis=0)])
    nodes[-1].output[0] = "output"
    return helper.make_function(DOMAIN, OP_TYPE, list(INPUTS), ["output"], nodes,
                                [helper.make_opsetid("", opset)], attributes=[*ATTRIBUTES, "scale"])  # fmt: skip
