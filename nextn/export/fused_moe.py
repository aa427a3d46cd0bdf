"""DeepSeekMoE's routed experts as two ONNX Runtime contrib ops, for export (`--moe fused`).

The reference runs each routed expert on the tokens that picked it: exported as is, that is ~20 ONNX
nodes per expert per layer (Equal, NonZero, GatherND, three MatMuls, ScatterND, ...), and on a small
model a decode step is then mostly per-node overhead (BENCHMARKS.md). Fused, one MoE layer's routed
part is four nodes, and an expert nobody picked still reads no weights:

    x [N, H] ─ MatMul(router_wt [H, E]) ─ logits [N, E] fp32 ─ com.microsoft.MoEGroupRouter(bias [E])
                                                                    │ router_probs [N, E]: log(sigmoid) at the
                                                                    │ top_k picked experts, -inf elsewhere
    x ─────────────────────────────────── com.microsoft.MoE(w13 [E, 2I, H], w2 [E, H, I], swiglu) ─ Mul(scale) ─ [N, H]

MoEGroupRouter is DeepSeek-V3's noaux_tc choice (sigmoid scores plus the correction bias pick
topk_group groups by their top-2 sum, then top_k experts within them). MoE takes a softmax of
router_probs: exp(log s_i) / sum over the picked s_j, which is the reference's normalized weight
(norm_topk_prob = true is therefore required). routed_scaling_factor stays a Mul, so the expert weights
are stored unchanged. w13 interleaves each expert's gate and up rows (gate_0, up_0, gate_1, ...), the
only SwiGLU layout ONNX Runtime's CPU kernel takes; MoE computes silu(gate) * up exactly
(activation_alpha 1, activation_beta 0, no clamp).

Only ONNX Runtime runs these ops (CPU and CUDA). `--moe sparse` keeps standard ONNX ops throughout,
for other runtimes (TensorRT). The graphs are validated against the reference like any other.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import torch
import torch.nn.functional as F

from nextn.errors import NextnError
from nextn.model.config import ModelConfig
from nextn.model.reference import MoE, route

MOE_FORMS = ("auto", "fused", "sparse")


def resolve_moe_form(requested: str, cfg: ModelConfig, dtype: str = "float32") -> str:
    """auto -> fused where the config (and dtype) allow it, else sparse."""
    if requested not in MOE_FORMS:
        raise NextnError(f"--moe {requested}: choose one of {', '.join(MOE_FORMS)}")
    if requested == "sparse":
        return "sparse"
    why = None
    if not cfg.norm_topk_prob:  # MoE's softmax always renormalizes the picked experts' weights
        why = "this checkpoint has norm_topk_prob = false, which the fused MoE op cannot express"
    elif cfg.n_group > 1 and cfg.num_experts_per_tok > cfg.topk_group * (cfg.n_routed_experts // cfg.n_group):
        why = (f"top {cfg.num_experts_per_tok} experts cannot come from {cfg.topk_group} group(s) of "
               f"{cfg.n_routed_experts // cfg.n_group} (MoEGroupRouter refuses it)")  # fmt: skip
    if why and requested == "fused":
        raise NextnError(f"--moe fused: {why} (use --moe sparse)")
    if why or (requested == "auto" and dtype == "bfloat16"):
        # bf16: MoE takes router_probs in bf16, whose 8-bit mantissa moves the routing weights by ~1-2%
        # (measured); the per-expert form keeps them in fp32. (ONNX Runtime's CPU has no bf16 MoE either.)
        return "sparse"
    return "fused"


# -- the op: eager (the reference's arithmetic on stacked weights), fake (shapes) and ONNX ---------------
@torch.library.custom_op("nextn::fused_moe", mutates_args=())
def fused_moe(x: torch.Tensor, router_wt: torch.Tensor, bias: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              top_k: int, n_group: int, topk_group: int, scale: float) -> torch.Tensor:  # fmt: skip
    """x [N, H], router_wt [H, E], bias [E], w13 [E, 2I, H] (gate/up interleaved), w2 [E, H, I] -> [N, H]."""
    ids, weights = route(x, router_wt.t(), bias, top_k, n_group, topk_group, True, scale)  # [N, K], [N, K]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [N, H]
    for e in range(w13.shape[0]):
        tok, slot = torch.where(ids == e)  # [n_e], [n_e]
        h = x[tok] @ w13[e].t()  # [n_e, 2I]
        a = F.silu(h[:, 0::2]) * h[:, 1::2]  # [n_e, I]
        out.index_add_(0, tok, (a @ w2[e].t()).float() * weights[tok, slot, None])
    return out.to(x.dtype)


@fused_moe.register_fake
def _(x, router_wt, bias, w13, w2, top_k, n_group, topk_group, scale):
    return torch.empty_like(x)


def _contrib_ops():
    """onnxscript Ops for MoEGroupRouter and MoE. The onnx package has no com.microsoft schemas, so
    each Op carries a minimal schema of its own (nothing is registered globally)."""
    import onnxscript
    from onnx.defs import OpSchema

    msft = onnxscript.values.Opset("com.microsoft", 1)
    P, A = OpSchema.FormalParameter, OpSchema.AttrType
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]

    def op(name, inputs, outputs, attrs):
        ins = [P(n.rstrip("?"), "T", param_option=OpSchema.FormalParameterOption.Optional) if n.endswith("?")
               else P(n, "T") for n in inputs]  # fmt: skip
        schema = OpSchema(name, "com.microsoft", 1, inputs=ins, outputs=[P(n, "T") for n in outputs],
                          type_constraints=[("T", floats, "")],
                          attributes=[OpSchema.Attribute(a, t) for a, t in attrs.items()])  # fmt: skip
        return onnxscript.values.Op(msft, name, schema)

    router = op("MoEGroupRouter", ["logits", "expert_bias"], ["router_probs"],
                dict(router_sentinel=A.FLOAT, group_topk=A.INT, topk_group=A.INT, n_group=A.INT, top_k=A.INT))
    moe = op("MoE", ["input", "router_probs", "fc1_experts_weights", "fc1_experts_bias?", "fc2_experts_weights"],
             ["output"], dict(k=A.INT, activation_type=A.STRING, swiglu_fusion=A.INT, activation_alpha=A.FLOAT,
                              activation_beta=A.FLOAT, normalize_routing_weights=A.INT))  # fmt: skip
    return router, moe


def onnx_translations() -> dict:
    """torch.onnx `custom_translation_table` entry for nextn::fused_moe."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    router_op, moe_op = _contrib_ops()

    def translate(x, router_wt, bias, w13, w2, top_k: int, n_group: int, topk_group: int, scale: float):
        # The router runs in fp32 whatever the model dtype (as the reference does); MoE takes router_probs
        # in the activations' dtype.
        wide = x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=ir.DataType.FLOAT)
        logits = op.MatMul(wide, router_wt)  # [N, E]
        # One group means no group limit (the reference skips it): MoEGroupRouter wants topk_group 1 then.
        probs = router_op(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group if n_group > 1 else 1,
                          group_topk=2, router_sentinel=float("-inf"))  # fmt: skip
        if x.dtype != ir.DataType.FLOAT:
            probs = op.Cast(probs, to=x.dtype)
        y = moe_op(x, probs, w13, None, w2, k=top_k, activation_type="swiglu", swiglu_fusion=1,
                   activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=0)  # fmt: skip
        # the scale as a constant of the activations' dtype: a CastLike would stay a node of its own in every layer
        return op.Mul(y, op.Constant(value=ir.tensor(np.array(scale, dtype=x.dtype.numpy()))))

    return {torch.ops.nextn.fused_moe.default: translate}


# -- swapping it in for export ---------------------------------------------------------------------
def _fused_forward(self: MoE, x: torch.Tensor) -> torch.Tensor:
    c = self.gate.cfg
    flat = x.reshape(-1, x.shape[-1])  # [N, H]
    out = fused_moe(flat, self.fused_router_wt, self.gate.e_score_correction_bias, self.fused_w13, self.fused_w2,
                    c.num_experts_per_tok, c.n_group, c.topk_group, float(c.routed_scaling_factor)).view(x.shape)
    return out + self.shared_experts(x) if self.shared_experts is not None else out  # fmt: skip


@contextlib.contextmanager
def fused_experts(model: torch.nn.Module):
    """Inside, every MoE of `model` (trunk and MTP modules) runs as one nextn::fused_moe on stacked expert
    weights; on exit the modules are as before. Stacks the loader made (`load_model(stack_experts=True)`:
    the experts' parameters are views of them, one copy in memory) are used as they are; otherwise they
    are built here, a second copy of the experts for the duration."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    built = []
    try:
        for m in moes:
            if "fused_w13" not in m._buffers:
                built.append(m)  # before allocating, so a failure below still removes the stacks
                for e, expert in enumerate(m.experts):
                    for proj in ("gate_proj", "up_proj", "down_proj"):
                        w = getattr(expert, proj).weight
                        m.stacked_slot(e, proj, w.dtype, w.device).copy_(w.detach())
            m.register_buffer("fused_router_wt", m.gate.weight.detach().t().contiguous(), persistent=False)  # [H, E]
            m.forward = types.MethodType(_fused_forward, m)
        yield
    finally:
        for m in moes:
            m.__dict__.pop("forward", None)
            m._buffers.pop("fused_router_wt", None)
        for m in built:
            m._buffers.pop("fused_w13", None)
            m._buffers.pop("fused_w2", None)
