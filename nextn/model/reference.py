"""A plain PyTorch reference of a DeepSeek-V3 trunk and its MTP modules, with explicit KV caches.

Read it top to bottom: norms and rotary, MLA attention (naive and absorbed forms), dense MLP and
DeepSeekMoE, the decoder block, the MTP module, and the model that ties them together.

Shapes: B batch, S new tokens, P past tokens, T = P + S, H hidden, nh heads, R kv_lora_rank,
D qk_rope_head_dim, V vocab.

KV cache: per layer the MLA *latent* cache, never decompressed per-head K/V:
    c_kv [B, T, R]   kv_a_layernorm(kv_a_proj(x))[..., :R]
    k_pe [B, T, D]   the rotated shared rope key
Every forward takes the past (P may be 0) and returns only the S new entries; the caller owns the
cache (see DESIGN.md). Module and parameter names mirror the checkpoint: `model.layers.{i}.…`,
`lm_head`, and `mtp.{k}.…` for the checkpoint's `model.layers.{num_hidden_layers + k}.…`.

Numerics follow transformers' DeepseekV3ForCausalLM and MtpModel: RMSNorm in fp32, rotary cos/sin
computed in fp32 then cast, softmax and router in fp32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nextn.model.config import ModelConfig


class LayerKV(NamedTuple):
    c_kv: torch.Tensor  # [B, T, R]
    k_pe: torch.Tensor  # [B, T, D]


class TrunkOutput(NamedTuple):
    logits: torch.Tensor  # [B, S, V]
    hidden: torch.Tensor  # [B, S, H], after the final norm: what MTP module 0 consumes
    new_kv: list[LayerKV]  # per layer, the S new entries


class MtpOutput(NamedTuple):
    logits: torch.Tensor  # [B, S, V] ([B, N, V] for N output rows)
    hidden: torch.Tensor  # [B, S, H] ([B, N, H]), after shared_head.norm: chained to depth k+1
    new_kv: LayerKV  # all S new entries, whichever rows were output


def take_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """t [B, S, ...] at rows [B, N] (indices into S per batch row) -> [B, N, ...]; rows None: t itself."""
    if rows is None:
        return t
    index = rows.view(*rows.shape, *[1] * (t.dim() - 2)).expand(*rows.shape, *t.shape[2:])
    return torch.gather(t, 1, index)


def query_rows(rows: torch.Tensor | None, x, cos, sin, mask):
    """What attention's queries read, at rows [B, N] (None: every row): x [B, N, H], cos/sin [B, N, D/2] and
    the mask [B, 1, N, T]. The keys keep every row: each writes its cache entry."""
    if rows is None:
        return x, cos, sin, mask
    return take_rows(x, rows), take_rows(cos, rows), take_rows(sin, rows), take_rows(mask[:, 0], rows)[:, None]


# -- norms and rotary ------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[D/2] inverse frequencies, with YaRN's blend of interpolated and extrapolated ones."""
    r, dim = cfg.rope, cfg.qk_rope_head_dim
    pos_freqs = r.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)  # [D/2]
    if r.kind != "yarn":
        return 1.0 / pos_freqs

    def correction_dim(rotations: float) -> float:
        return dim * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(r.theta))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (high-frequency dims)
    return (1.0 / (r.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # [D/2]
        self.scale = cfg.rope.cos_sin_scale()
        self.interleave = cfg.rope_interleave

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, S, D/2]
        return (freqs.cos() * self.scale).to(dtype), (freqs.sin() * self.scale).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, S, n, D] (n heads, or 1 for k_pe) by cos/sin [B, S, D/2].

        DeepSeek pairs dims (0,1), (2,3), ... (interleaved) while rope_interleave=false pairs (i, i+D/2).
        The output is in "halves" layout [x1 cos - x2 sin, x2 cos + x1 sin] either way (as in
        transformers); q and k share it, so q.k is unchanged and the cached k_pe uses this layout.
        """
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        c, s = cos[:, :, None, :], sin[:, :, None, :]  # [B, S, 1, D/2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


# -- attention -------------------------------------------------------------------------------------
def linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False)


class MLA(nn.Module):
    """Multi-head latent attention over a latent cache, in naive or absorbed form.

    naive:     K/V per head = kv_b_proj(c_kv) for all T cached tokens, then ordinary attention.
    absorbed:  W_UK is folded into the query and W_UV into the output, so attention runs in the
               R-dim latent space and never expands the cache: cheaper per step when T*nh*(dn+dv) > S*nh*R.

        q_nope [B,nh,S,dn] @ W_UK [nh,dn,R] -> q_lat [B,nh,S,R] -\
                                                                 cat -> [B,nh,S,R+D] @ [c_kv; k_pe]^T [B,1,R+D,T]
        q_pe   [B,nh,S,D]  ---------------------------------------/      -> softmax -> p [B,nh,S,T]
        p @ c_kv [B,1,T,R] -> o_lat [B,nh,S,R] @ W_UV^T [nh,R,dv] -> o [B,nh,S,dv] -> o_proj
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = linear(h, nh * cfg.qk_head_dim)
        else:
            self.q_a_proj = linear(h, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = linear(cfg.q_lora_rank, nh * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = linear(nh * cfg.v_head_dim, h)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, H]
        rotary: Rotary,
        cos: torch.Tensor,  # [B, S, D/2]
        sin: torch.Tensor,
        mask: torch.Tensor,  # [B, 1, S, T] bool, True = attend
        past: LayerKV,  # [B, P, R], [B, P, D]
        absorbed: bool,
        rows: torch.Tensor | None = None,  # [B, N]: only these rows query (all S rows enter the cache)
    ) -> tuple[torch.Tensor, LayerKV]:
        cfg = self.cfg
        nh, dn, dr, dv, r = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                             cfg.v_head_dim, cfg.kv_lora_rank)  # fmt: skip
        xq, cos_q, sin_q, mask = query_rows(rows, x, cos, sin, mask)  # [B, N, ...], mask [B, 1, N, T]
        b, s, _ = xq.shape  # s: the query rows (S, or N)
        if cfg.q_lora_rank is None:
            q = self.q_proj(xq)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(xq)))
        q = q.view(b, s, nh, dn + dr)  # [B, S, nh, dn + D]
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        q_pe = rotary.apply(q_pe, cos_q, sin_q)  # [B, S, nh, D]

        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)  # [B, S, R], [B, S, D]
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = rotary.apply(k_pe[:, :, None, :], cos, sin)[:, :, 0, :]  # [B, S, D]
        new = LayerKV(c_kv, k_pe)
        all_ckv = torch.cat([past.c_kv, c_kv], dim=1)  # [B, T, R]
        all_kpe = torch.cat([past.k_pe, k_pe], dim=1)  # [B, T, D]

        if absorbed:
            w = self.kv_b_proj.weight.view(nh, dn + dv, r)
            w_uk, w_uv = w[:, :dn], w[:, dn:]  # [nh, dn, R], [nh, dv, R]
            q_lat = q_nope.transpose(1, 2) @ w_uk  # [B, nh, S, R]
            # One MQA-style product over the concatenated latent key [c_kv; k_pe] of width R + D.
            q_cat = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1)  # [B, nh, S, R + D]
            k_cat = torch.cat([all_ckv, all_kpe], dim=-1)[:, None]  # [B, 1, T, R + D]
            p = _softmax((q_cat @ k_cat.transpose(-1, -2)) * cfg.softmax_scale, mask)  # [B, nh, S, T]
            o_lat = p @ all_ckv[:, None]  # [B, nh, S, R]
            o = (o_lat @ w_uv.transpose(-1, -2)).transpose(1, 2)  # [B, S, nh, dv]
        else:
            t = all_ckv.shape[1]
            kv = self.kv_b_proj(all_ckv).view(b, t, nh, dn + dv)  # [B, T, nh, dn + dv]
            k_nope, v = kv.split([dn, dv], dim=-1)
            k = torch.cat([k_nope, all_kpe[:, :, None, :].expand(b, t, nh, dr)], dim=-1)  # [B, T, nh, dn + D]
            qq = torch.cat([q_nope, q_pe], dim=-1)  # [B, S, nh, dn + D]
            scores = qq.transpose(1, 2) @ k.permute(0, 2, 3, 1)  # [B, nh, S, T]
            p = _softmax(scores * cfg.softmax_scale, mask)
            o = (p @ v.transpose(1, 2)).transpose(1, 2)  # [B, S, nh, dv]
        return self.o_proj(o.reshape(b, s, nh * dv)), new


def _softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # A finite fill keeps fully masked rows (padding queries) uniform instead of NaN.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


# -- feed-forward ----------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = linear(hidden, inner)
        self.up_proj = linear(hidden, inner)
        self.down_proj = linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores; e_score_correction_bias steers the (group-limited) choice but not the weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e = cfg.n_routed_experts
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(e, cfg.hidden_size))  # kept in fp32
        self.e_score_correction_bias = nn.Parameter(torch.zeros(e))  # kept in fp32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> expert ids [N, K] int64, weights [N, K] fp32."""
        c = self.cfg
        return route(x, self.weight, self.e_score_correction_bias, c.num_experts_per_tok, c.n_group, c.topk_group,
                     c.norm_topk_prob, c.routed_scaling_factor)  # fmt: skip


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
          norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """DeepSeek-V3's noaux_tc routing: x [N, H], weight [E, H], bias [E] -> ids [N, top_k], weights [N, top_k] fp32."""
    n, e, g = x.shape[0], weight.shape[0], n_group
    scores = F.linear(x.float(), weight.float()).sigmoid()  # [N, E]
    choice = scores + bias
    if g > 1:
        per_group = choice.view(n, g, e // g)  # [N, G, E/G]
        group_scores = per_group.topk(min(2, e // g), dim=-1).values.sum(-1)  # [N, G]
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1).indices, 1.0)
        keep = keep.bool()[:, :, None].expand(n, g, e // g).reshape(n, e)  # [N, E]
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices  # [N, K]
    weights = scores.gather(1, ids)  # [N, K]
    if norm:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scale


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts))
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, H]
        ids, weights = self.gate(flat)  # [N, K], [N, K]
        # Each expert runs on the tokens that picked it, in expert order (the order transformers sums
        # in). Unrolled over all experts with data-dependent token counts, so it exports as is and an
        # expert nobody picked costs no FLOPs and reads no weights. The sum is kept in fp32 (exact for
        # fp32 models; for 16-bit ones it rounds once instead of per expert, and ONNX Runtime's CPU
        # scatter-add has no 16-bit kernel).
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)  # [N, H]
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)  # [n_e], [n_e]
            out.index_add_(0, tok, expert(flat[tok]) * weights[tok, slot, None])  # [n_e, H] fp32
        out = out.to(x.dtype).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def stacked_slot(self, e: int, proj: str, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
        """Where expert e's `proj` weight lives in the stacked layout of the fused MoE export: buffers
        `fused_w13` [E, 2I, H] (gate and up rows interleaved: gate_0, up_0, gate_1, ..., the layout ONNX
        Runtime's CPU MoE takes) and `fused_w2` [E, H, I], allocated on first use (on the meta device for
        a streamed export's trace, which never holds weights)."""
        if "fused_w13" not in self._buffers:
            n, (i, h) = len(self.experts), self.experts[0].gate_proj.weight.shape
            self.register_buffer("fused_w13", torch.empty(n, 2 * i, h, dtype=dtype, device=device), persistent=False)
            self.register_buffer("fused_w2", torch.empty(n, h, i, dtype=dtype, device=device), persistent=False)
        if proj == "down_proj":
            return self.fused_w2[e]  # [H, I]
        return self.fused_w13[e, 0::2] if proj == "gate_proj" else self.fused_w13[e, 1::2]  # [I, H]


# -- blocks ----------------------------------------------------------------------------------------
class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rotary, cos, sin, mask, past: LayerKV, absorbed: bool,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerKV]:  # fmt: skip
        """x [B, S, H] -> [B, S, H] (rows [B, N]: [B, N, H], those rows only; the cache takes all S)."""
        a, new = self.self_attn(self.input_layernorm(x), rotary, cos, sin, mask, past, absorbed, rows)
        x = take_rows(x, rows) + a
        return x + self.mlp(self.post_attention_layernorm(x)), new


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = linear(cfg.hidden_size, cfg.vocab_size)


class MtpModule(DecoderBlock):
    """MTP module k: h = eh_proj([enorm(embed(tokens)); hnorm(h_prev)]) -> decoder block -> shared_head.norm.

    The normalized output is both the input of the shared head (logits) and the hidden chained to
    depth k+1 (transformers' MtpLayer with post_norm = shared_head.norm). `rows` [B, N] computes the
    attention output, feed-forward, norm and head for those rows only; every row still writes its cache
    entry (that needs only the projections before attention). The decoder's last module wants its last
    row's output alone: the draft and the hidden that recursion feeds back.
    """

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__(cfg, index)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)

    def forward(self, input_ids, hidden, rotary, cos, sin, mask, past: LayerKV, absorbed: bool,
                rows: torch.Tensor | None = None) -> MtpOutput:  # fmt: skip
        e = self.enorm(self.embed_tokens(input_ids))  # [B, S, H]
        x = self.eh_proj(torch.cat([e, self.hnorm(hidden)], dim=-1))  # [B, S, H]
        x, new = super().forward(x, rotary, cos, sin, mask, past, absorbed, rows)  # [B, N, H]
        x = self.shared_head.norm(x)
        return MtpOutput(self.shared_head.head(x), x, new)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def causal_mask(position_ids: torch.Tensor, past_len: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, 1, S, T] bool: new token i sees cache slots j <= past_len + i that attention_mask marks valid.

    attention_mask [B, T] (1 = a real token) lets sequences of different lengths share a batch:
    padded slots, anywhere in the cache, are never attended.
    """
    b, s = position_ids.shape
    t = past_len + s
    q = torch.arange(s, device=position_ids.device)[:, None] + past_len  # [S, 1]
    k = torch.arange(t, device=position_ids.device)[None, :]  # [1, T]
    mask = (k <= q)[None, None].expand(b, 1, s, t)  # [B, 1, S, T]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    return mask


class DeepseekV3(nn.Module):
    """Trunk (`model`, `lm_head`) and MTP modules (`mtp`), as in the checkpoint."""

    def __init__(self, cfg: ModelConfig, num_mtp: int | None = None, absorbed: bool = False):
        super().__init__()
        self.cfg = cfg
        self.absorbed = absorbed
        self.model = Backbone(cfg)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)
        n = cfg.num_nextn_predict_layers if num_mtp is None else num_mtp
        self.mtp = nn.ModuleList(MtpModule(cfg, cfg.num_hidden_layers + k) for k in range(n))
        self.rotary = Rotary(cfg)

    def empty_kv(self, batch: int, dtype: torch.dtype | None = None, device=None) -> LayerKV:
        """A zero-length past for one layer: [B, 0, R], [B, 0, D]."""
        dtype = dtype or self.lm_head.weight.dtype
        device = device or self.lm_head.weight.device
        c = self.cfg
        return LayerKV(torch.zeros(batch, 0, c.kv_lora_rank, dtype=dtype, device=device),
                       torch.zeros(batch, 0, c.qk_rope_head_dim, dtype=dtype, device=device))  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64
        position_ids: torch.Tensor,  # [B, S] int64
        past: list[LayerKV] | None = None,  # per layer [B, P, R], [B, P, D]
        attention_mask: torch.Tensor | None = None,  # [B, P + S]
    ) -> TrunkOutput:
        b = input_ids.shape[0]
        x = self.model.embed_tokens(input_ids)  # [B, S, H]
        past = past if past is not None else [self.empty_kv(b, x.dtype, x.device)] * len(self.model.layers)
        cos, sin = self.rotary(position_ids, x.dtype)  # [B, S, D/2]
        mask = causal_mask(position_ids, past[0].c_kv.shape[1], attention_mask)
        new_kv = []
        for layer, layer_past in zip(self.model.layers, past, strict=True):
            x, new = layer(x, self.rotary, cos, sin, mask, layer_past, self.absorbed)
            new_kv.append(new)
        hidden = self.model.norm(x)
        return TrunkOutput(self.lm_head(hidden), hidden, new_kv)

    def mtp_forward(
        self,
        k: int,
        input_ids: torch.Tensor,  # [B, S]: the tokens one step ahead of `hidden`'s positions
        hidden: torch.Tensor,  # [B, S, H]: trunk hidden (k = 0) or depth k-1's hidden_out
        position_ids: torch.Tensor,  # [B, S]: positions of input_ids
        past: LayerKV | None = None,
        attention_mask: torch.Tensor | None = None,
        output_rows: torch.Tensor | None = None,  # [B, N] int64: the rows whose logits and hidden are wanted
    ) -> MtpOutput:
        module = self.mtp[k]
        past = past if past is not None else self.empty_kv(input_ids.shape[0], hidden.dtype, hidden.device)
        cos, sin = self.rotary(position_ids, hidden.dtype)
        mask = causal_mask(position_ids, past.c_kv.shape[1], attention_mask)
        return module(input_ids, hidden, self.rotary, cos, sin, mask, past, self.absorbed, output_rows)
