"""Joint training of trunk and MTP modules with DeepSeek-V3's objective, on a token stream.

For a window t_0 .. t_{T-1}:
- trunk: hidden h0_i after the final norm predicts t_{i+1};
- MTP depth k (0-based): at position i it combines h^k_i (h^0 = trunk hidden, h^{k+1} = depth k's
  normalized output) with the embedding of t_{i+k+1}, and predicts t_{i+k+2}. Depth k therefore sees
  T-k-1 positions and has T-k-2 targets, exactly what `DeepseekV3.mtp_forward` computes at inference.

    loss = CE(trunk) + lambda * mean_k CE(depth k)

MoE routing is balanced without an auxiliary loss, as in DeepSeek-V3: after each step every
expert's `e_score_correction_bias` moves by `bias_update` towards the mean load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nextn.model.config import ModelConfig, RopeConfig, config_to_hf
from nextn.model.reference import DeepseekV3, LayerKV, Router
from nextn.model.weights import param_name
from nextn.testing import checkpoint_names, tiny_config

log = logging.getLogger(__name__)


def embedded_config(vocab_size: int = 2048) -> ModelConfig:
    """The shipped model: 10 trunk layers (2 dense, 8 MoE with 8 routed + 1 shared expert, top-2),
    MLA with q/kv low-rank projections, 2 MTP modules; ~11M parameters, ~22 MB in bf16."""
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=640, moe_intermediate_size=96,
        num_hidden_layers=10, num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=2,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=2, routed_scaling_factor=2.5, max_position_embeddings=1024,
        rope=RopeConfig(theta=10000.0), torch_dtype="bfloat16", bos_token_id=1, eos_token_ids=(0,),
    )  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    steps: int
    batch: int = 16  # windows per step
    seq_len: int = 256  # tokens per window
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay down to lr * this
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3  # DeepSeek-V3: 0.3, then 0.1; the embedded model weights its drafts more (0.5)
    bias_update: float = 1e-3  # aux-loss-free balancing speed (DeepSeek-V3: 1e-3 over far more steps)
    seed: int = 0
    eval_windows: int = 64
    distill_steps: int = 0  # stage 2 (distill_mtp), run on the saved stage-1 weights
    distill_lr: float = 1e-3
    distill_batch: int = 16  # windows per stage-2 step
    # Share of each stage-2 batch taken from the trunk's own greedy continuations (0: corpus only).
    # Greedy decoding feeds the drafts the trunk's tokens, not the corpus's, so these windows are what
    # acceptance is measured on (EAGLE and Medusa-2 distil on the target's generations for this reason).
    distill_greedy: float = 0.0


PRESETS: dict[str, Callable[[int], TrainConfig]] = {
    "embedded": lambda vocab: TrainConfig(
        embedded_config(vocab), steps=1200, lr=3e-3, warmup=50, mtp_lambda=0.5, bias_update=1e-2, distill_steps=300,
        distill_greedy=0.5,  # as the shipped drafts' second distillation (training.json), at this preset's size
    ),
    "tiny": lambda vocab: TrainConfig(
        tiny_config(vocab_size=vocab, max_position_embeddings=256), steps=30, batch=4, seq_len=32,
        lr=3e-3, warmup=5, eval_windows=4, distill_steps=5, distill_batch=4,
    ),
}


# -- model -----------------------------------------------------------------------------------------
def build_model(cfg: ModelConfig, seed: int) -> DeepseekV3:
    """fp32 model, GPT-2-style init; MTP modules share the trunk's embedding and head (as in DeepSeek-V3)."""
    torch.manual_seed(seed)
    model = DeepseekV3(cfg, absorbed=False)
    out_proj = ("o_proj.weight", "down_proj.weight")
    n_blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.zero_()
                p.requires_grad_(False)  # moved by the balancing rule, not by gradients
            elif p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                std = 0.02 / math.sqrt(2 * n_blocks) if name.endswith(out_proj) else 0.02
                p.normal_(0.0, std)
    for m in model.mtp:
        m.embed_tokens = model.model.embed_tokens
        m.shared_head.head = model.lm_head
    return model


def mtp_logits(model: DeepseekV3, tokens: torch.Tensor, pos: torch.Tensor, hidden: torch.Tensor) -> list[torch.Tensor]:
    """Every MTP depth along a window, each fed the true tokens and the previous depth's hidden (the
    trunk's [B, T, H] for depth 0): per depth k, logits [B, T-k-1, V], position j drafting token j+k+2."""
    t, out = tokens.shape[1], []
    for k in range(len(model.mtp)):
        n = t - k - 1  # positions depth k sees
        o = model.mtp_forward(k, tokens[:, k + 1 :], hidden[:, :n], pos[:, k + 1 :])
        out.append(o.logits)
        hidden = o.hidden  # [B, n, H]
    return out


def losses(model: DeepseekV3, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """tokens [B, T] -> trunk CE, [CE of MTP depth k for each k]."""
    b, t = tokens.shape
    pos = torch.arange(t, device=tokens.device)[None].expand(b, t)  # [B, T]
    out = model(tokens, pos)
    trunk = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    mtp = [F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, k + 2 :].flatten())
           for k, logits in enumerate(mtp_logits(model, tokens, pos, out.hidden))]  # fmt: skip
    return trunk, mtp


class _LoadCounter:
    """Counts how many tokens each router sends to each expert (forward hooks)."""

    def __init__(self, model: nn.Module):
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.loads = {id(r): torch.zeros(r.weight.shape[0], device=r.weight.device) for r in self.routers}
        self.handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, router, inputs, output) -> None:
        ids = output[0]  # [N, K]
        self.loads[id(router)] += torch.bincount(ids.flatten(), minlength=router.weight.shape[0]).float()

    def update_biases(self, speed: float) -> float:
        """bias += speed * sign(mean load - load); returns the max/mean load ratio seen."""
        worst = 0.0
        with torch.no_grad():
            for r in self.routers:
                load = self.loads[id(r)]
                if load.sum() > 0:
                    r.e_score_correction_bias += speed * torch.sign(load.mean() - load)
                    worst = max(worst, float(load.max() / load.mean()))
                load.zero_()
        return worst

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def windows(stream: np.ndarray, n: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    """n random windows [n, seq_len] int64 from a token stream."""
    starts = rng.integers(0, len(stream) - seq_len, size=n)
    return torch.from_numpy(np.stack([stream[s : s + seq_len] for s in starts]).astype(np.int64))


def cosine_lr(step: int, steps: int, lr: float, warmup: int = 0, min_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay from lr to lr * min_ratio."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def heldout_windows(tc: TrainConfig, stream: np.ndarray) -> torch.Tensor:
    """The fixed held-out windows every evaluation of a run uses [eval_windows, seq_len]."""
    return windows(stream, tc.eval_windows, tc.seq_len, np.random.default_rng(tc.seed + 1))


@torch.no_grad()
def evaluate(model: DeepseekV3, batch: torch.Tensor, chunk: int = 8) -> dict:
    """Mean CE of trunk and each MTP depth over fixed held-out windows [N, T]."""
    was_training = model.training
    model.eval()
    sums, device = None, model.lm_head.weight.device
    for i in range(0, len(batch), chunk):
        trunk, mtp = losses(model, batch[i : i + chunk].to(device))
        vals = [float(trunk), *map(float, mtp)]
        sums = vals if sums is None else [a + b for a, b in zip(sums, vals)]
    model.train(was_training)
    n = math.ceil(len(batch) / chunk)
    return {"trunk": sums[0] / n, "mtp": [v / n for v in sums[1:]]}


def train(
    tc: TrainConfig,
    train_stream: np.ndarray,
    heldout_stream: np.ndarray,
    on_step: Callable[[int, dict], None] | None = None,
    device: str = "cpu",
) -> tuple[DeepseekV3, dict]:
    """Train from scratch on `device`; returns the model (fp32) and a history with losses and held-out
    figures."""
    rng = np.random.default_rng(tc.seed)
    eval_batch = heldout_windows(tc, heldout_stream)
    model = build_model(tc.model, tc.seed).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    counter = _LoadCounter(model)
    history: dict = {"steps": [], "start_heldout": evaluate(model, eval_batch)}
    t0 = time.perf_counter()
    for step in range(tc.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, tc.steps, tc.lr, tc.warmup, tc.min_lr_ratio)
        tokens = windows(train_stream, tc.batch, tc.seq_len, rng).to(device)
        trunk, mtp = losses(model, tokens)
        loss = trunk + tc.mtp_lambda * torch.stack(mtp).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        imbalance = counter.update_biases(tc.bias_update)
        row = {"step": step, "loss": loss.item(), "trunk": trunk.item(), "mtp": [m.item() for m in mtp],
               "max_load": imbalance, "s": time.perf_counter() - t0}  # fmt: skip
        history["steps"].append(row)
        if on_step is not None:
            on_step(step, row)
    counter.close()
    history["heldout"] = evaluate(model, eval_batch)
    history["train_seconds"] = time.perf_counter() - t0
    model.eval()
    return model, history


# -- saving ----------------------------------------------------------------------------------------
def save_checkpoint(model: DeepseekV3, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """DeepSeek-V3 Hugging Face layout: config.json, generation_config.json, model.safetensors.

    MTP modules go to model.layers.{L+k}; their embedding/head copies are left out (they are the
    trunk's; readers fall back to it). Routers stay fp32, as DeepSeek ships them.
    """
    from safetensors.torch import save_file

    cfg = dataclasses.replace(model.cfg, torch_dtype=str(dtype).removeprefix("torch."))
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in checkpoint_names(cfg, mtp_copies=False):
        t = model.get_parameter(param_name(cfg, name)).detach().cpu()
        keep_fp32 = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        tensors[name] = t.float().contiguous() if keep_fp32 else t.to(dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, "official"), indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids), "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


# -- stage 2: self-distillation of the MTP modules ----------------------------------------------------
GREEDY_PROMPT = 32  # tokens of corpus before each greedy continuation


def greedy_prompt_len(seq_len: int) -> int:
    """Corpus tokens before the continuation in a greedy window of seq_len: GREEDY_PROMPT, or half a short
    window (so that it always holds a continuation)."""
    return min(GREEDY_PROMPT, seq_len // 2)


@torch.no_grad()
def greedy_windows(model: DeepseekV3, stream: np.ndarray, n: int, seq_len: int, rng: np.random.Generator,
                   chunk: int = 256) -> torch.Tensor:  # fmt: skip
    """[n, seq_len] int64 windows on the model's device: greedy_prompt_len(seq_len) tokens of the stream,
    then the trunk's own greedy continuation, decoded with the latent cache."""
    device = model.lm_head.weight.device
    was_training, prompt = model.training, greedy_prompt_len(seq_len)
    model.eval()
    out = []
    for i in range(0, n, chunk):
        ids = windows(stream, min(chunk, n - i), prompt, rng).to(device)  # [m, P]
        pos = torch.arange(prompt, device=device)[None].expand(len(ids), -1)
        step = model(ids, pos)
        past = step.new_kv
        for t in range(prompt, seq_len):
            nxt = step.logits[:, -1].argmax(-1, keepdim=True)  # [m, 1]
            ids = torch.cat([ids, nxt], dim=1)
            if t == seq_len - 1:
                break
            step = model(nxt, torch.full_like(nxt, t), past)
            past = [LayerKV(torch.cat([p.c_kv, q.c_kv], 1), torch.cat([p.k_pe, q.k_pe], 1))
                    for p, q in zip(past, step.new_kv)]  # fmt: skip
        out.append(ids)
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def draft_agreement(model: DeepseekV3, batch: torch.Tensor, start: int | None = None, chunk: int = 32) -> list[float]:
    """Per depth, the share of positions whose draft (argmax) equals the trunk's argmax for the same token,
    over the tokens of `batch` [N, T] from index `start` on (default: where greedy_windows' continuations
    start), every depth fed the true tokens: along greedy continuations this is greedy acceptance at each
    draft position given the earlier ones accepted."""
    start = greedy_prompt_len(batch.shape[1]) if start is None else start
    hits, total = None, None
    for i in range(0, len(batch), chunk):
        tokens = batch[i : i + chunk]
        b, t = tokens.shape
        pos = torch.arange(t, device=tokens.device)[None].expand(b, t)
        out = model(tokens, pos)
        want = out.logits.argmax(-1)  # [B, T]: the trunk's pick for token j + 1
        row_hits, row_total = [], []
        for k, logits in enumerate(mtp_logits(model, tokens, pos, out.hidden)):
            first = max(0, start - k - 2)  # depth k at position j drafts token j + k + 2
            same = logits[:, first:].argmax(-1) == want[:, k + 1 + first :]
            row_hits.append(int(same.sum()))
            row_total.append(same.numel())
        hits = row_hits if hits is None else [a + c for a, c in zip(hits, row_hits)]
        total = row_total if total is None else [a + c for a, c in zip(total, row_total)]
    return [h / max(1, n) for h, n in zip(hits, total)]


def _mtp_params(model: DeepseekV3) -> list[nn.Parameter]:
    """The MTP modules' own weights: not the embedding and head they share with the trunk, not the
    routers' balancing biases (names, not pointers, decide: moving a model between devices can split
    tensors that shared storage)."""
    params = []
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.mtp:
        for name, p in m.named_parameters():
            if not name.startswith(("embed_tokens", "shared_head.head")) and not name.endswith("e_score_correction_bias"):
                p.requires_grad_(True)
                params.append(p)
    return params


def distill_mtp(
    model: DeepseekV3,
    stream: np.ndarray,
    tc: TrainConfig,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train the MTP modules towards the trunk's own next-token distribution for `tc.distill_steps` steps
    of `tc.distill_batch` windows, on the model's device; the trunk (and the shared embedding and head)
    stay frozen, so the model's greedy output does not change.

    Depth k at position i predicts token i+k+2; the trunk's distribution for that token, given the same
    prefix, is its output at position i+k+1. Drafts are accepted when they match the trunk, not the
    corpus, so this is the quantity acceptance measures (Medusa-2's and EAGLE's self-distillation). A
    `tc.distill_greedy` share of each batch comes from a pool of the trunk's greedy continuations, made
    once before the first step (each window seen about 4 times).
    """
    device = model.lm_head.weight.device
    params = _mtp_params(model)
    opt = torch.optim.AdamW(params, lr=tc.distill_lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(tc.seed + 2)
    # windows per batch from the pool: at least one when asked for any (a small batch would round to none)
    n_greedy = min(tc.distill_batch, max(1, round(tc.distill_batch * tc.distill_greedy))) if tc.distill_greedy else 0
    t0 = time.perf_counter()
    pool_size = min(16384, math.ceil(tc.distill_steps * n_greedy / 4))
    chunk = 2048 if device.type == "cuda" else 64  # rows decoded together: a GPU wants them wide
    pool = greedy_windows(model, stream, pool_size, tc.seq_len, rng, chunk) if n_greedy else None
    history: dict = {"steps": [], "greedy_windows": pool_size if n_greedy else 0,
                     "greedy_seconds": time.perf_counter() - t0}  # fmt: skip
    model.train()
    t0 = time.perf_counter()
    for step in range(tc.distill_steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, tc.distill_steps, tc.distill_lr)
        parts = [windows(stream, tc.distill_batch - n_greedy, tc.seq_len, rng).to(device)] if n_greedy < tc.distill_batch else []
        if n_greedy:
            parts.append(pool[torch.from_numpy(rng.integers(0, len(pool), n_greedy)).to(device)])
        tokens = torch.cat(parts)  # [B, T]
        loss, mtp = _distill_loss(model, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        row = {"step": step, "mtp_vs_trunk": [m.item() for m in mtp], "s": time.perf_counter() - t0}
        history["steps"].append(row)
        if on_step is not None:
            on_step(step, row)
    for p in params:
        p.requires_grad_(False)
    model.eval()
    history["train_seconds"] = time.perf_counter() - t0
    return history


def _distill_loss(model: DeepseekV3, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """tokens [B, T] -> mean over depths of CE(depth k's drafts, the trunk's distribution), per depth."""
    b, t = tokens.shape
    pos = torch.arange(t, device=tokens.device)[None].expand(b, t)
    with torch.no_grad():
        out = model(tokens, pos)
        target = F.softmax(out.logits.float(), dim=-1)  # [B, T, V]
    mtp = [F.cross_entropy(logits.flatten(0, 1), target[:, k + 1 :].flatten(0, 1))
           for k, logits in enumerate(mtp_logits(model, tokens, pos, out.hidden))]  # fmt: skip
    return torch.stack(mtp).mean(), mtp
