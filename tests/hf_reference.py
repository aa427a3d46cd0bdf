"""Tiny random checkpoints written by transformers itself, and transformers' models loaded from them.

This is the independent side of every exactness test: the trunk comes from
`DeepseekV3ForCausalLM(...).save_pretrained`, the MTP layers from transformers' own MTP config
(`config.get_mtp_config()`, saved the same way) renamed to DeepSeek's `model.layers.{L+k}` naming,
with `enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and copies of the embedding and head added.
Nothing here uses nextn.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class HFSpec:
    q_lora: bool = True
    yarn: bool = True
    mscale: tuple[float, float] = (1.0, 1.0)  # (mscale, mscale_all_dim)
    interleave: bool = True
    mtp: int = 2
    first_dense: int = 1
    n_group: int = 4
    norm_topk_prob: bool = True
    sharded: bool = False
    style: str = "hf"  # "hf": rope_parameters; "official": rope_theta + rope_scaling
    layers: int = 3
    seed: int = 0


def hf_config(spec: HFSpec):
    from transformers import DeepseekV3Config

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if spec.yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256,
                "beta_fast": 32, "beta_slow": 1, "mscale": spec.mscale[0], "mscale_all_dim": spec.mscale[1]}  # fmt: skip
    return DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=spec.layers, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, kv_lora_rank=32, q_lora_rank=48 if spec.q_lora else None, qk_rope_head_dim=8,
        v_head_dim=16, qk_nope_head_dim=16, n_group=spec.n_group, topk_group=min(2, spec.n_group),
        num_experts_per_tok=2, first_k_dense_replace=spec.first_dense, norm_topk_prob=spec.norm_topk_prob,
        routed_scaling_factor=2.5, max_position_embeddings=1024, num_mtp_layers=spec.mtp,
        rope_parameters=rope, rope_interleave=spec.interleave, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """O(1) activations: std 1/sqrt(fan_in) weights, norms near 1, a real router bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if "inv_freq" in name:
                continue
            if name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif t.dim() == 1:
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            elif "embed_tokens" in name:
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1]))


def make_hf_checkpoint(path: Path, spec: HFSpec) -> Path:
    from transformers import DeepseekV3ForCausalLM

    cfg = hf_config(spec)
    torch.manual_seed(spec.seed)
    main = DeepseekV3ForCausalLM(cfg)
    _randomize(main, spec.seed)
    main.save_pretrained(path, max_shard_size="40KB" if spec.sharded else "10GB")

    mtp_tensors: dict[str, torch.Tensor] = {}
    if spec.mtp:
        # transformers' MTP config: same classes, num_hidden_layers = number of MTP layers, all MoE.
        helper = DeepseekV3ForCausalLM(cfg.get_mtp_config())
        _randomize(helper, spec.seed + 1)
        with tempfile.TemporaryDirectory() as tmp:
            helper.save_pretrained(tmp)
            saved = load_file(str(Path(tmp) / "model.safetensors"))
        trunk = _read_all(path)
        g = torch.Generator().manual_seed(spec.seed + 2)
        h, L = cfg.hidden_size, cfg.num_hidden_layers
        for k in range(spec.mtp):
            for name, t in saved.items():
                m = re.match(rf"model\.layers\.{k}\.(.*)", name)
                if m:
                    mtp_tensors[f"model.layers.{L + k}.{m.group(1)}"] = t
            p = f"model.layers.{L + k}"
            mtp_tensors[f"{p}.enorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
            mtp_tensors[f"{p}.hnorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
            mtp_tensors[f"{p}.eh_proj.weight"] = torch.randn(h, 2 * h, generator=g) / math.sqrt(2 * h)
            mtp_tensors[f"{p}.shared_head.norm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
            mtp_tensors[f"{p}.shared_head.head.weight"] = trunk["lm_head.weight"].clone()
            mtp_tensors[f"{p}.embed_tokens.weight"] = trunk["model.embed_tokens.weight"].clone()
    _add_tensors(path, mtp_tensors, sharded=spec.sharded)

    if spec.style == "official":
        raw = json.loads((path / "config.json").read_text())
        rope = raw.pop("rope_parameters")
        raw["rope_theta"] = rope.pop("rope_theta")
        kind = rope.pop("rope_type")
        raw["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
        (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _add_tensors(path: Path, tensors: dict[str, torch.Tensor], sharded: bool) -> None:
    if not tensors:
        return
    if sharded:
        index_path = path / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        save_file(tensors, str(path / "model-mtp.safetensors"), metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(tensors, "model-mtp.safetensors"))
        index_path.write_text(json.dumps(index, indent=2))
    else:
        f = path / "model.safetensors"
        all_t = load_file(str(f))
        all_t.update(tensors)
        save_file(all_t, str(f), metadata={"format": "pt"})


def load_hf(path: Path):
    """transformers' trunk and MtpModel from a checkpoint made above (fp32, eval)."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    cfg = json.loads((path / "config.json").read_text())
    first = cfg["num_hidden_layers"]
    last = first + cfg.get("num_nextn_predict_layers", 0)
    pattern = "|".join(str(i) for i in range(first, last)) or str(first)

    class Main(DeepseekV3ForCausalLM):
        # The stock class ignores only layer 61; ignore this checkpoint's MTP layers instead.
        _keys_to_ignore_on_load_unexpected = [rf"model\.layers\.({pattern})\..*"]

    main = Main.from_pretrained(path, dtype=torch.float32).eval()
    mtp = MtpModel.from_pretrained(main).eval() if last > first else None
    return main, mtp
