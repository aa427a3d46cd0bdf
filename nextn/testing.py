"""Random DeepSeek-V3-format checkpoints of any size, for tests and benchmarks.

`write_random_checkpoint(out, cfg)` writes config.json, generation_config.json and safetensors
(single file or shards) in DeepSeek's naming, MTP modules included, one shard in memory at a time.
Weights are scaled so activations and logits stay O(1) (std 1/sqrt(fan_in)), which makes absolute
tolerances in tests meaningful. `weights="fp8"` block-quantizes the linear weights as DeepSeek does.

    python -m nextn.testing OUT [--preset tiny|small|1gb] [--weights float32|bfloat16|fp8]
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from nextn.model.checkpoint import quantize_fp8
from nextn.model.config import ModelConfig, QuantConfig, RopeConfig, config_to_hf
from nextn.model.weights import MTP_SHARED, mtp_prefix, mtp_shapes, trunk_shapes, trunk_twin

WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_config(**overrides) -> ModelConfig:
    """A few-layer model with every feature on: q_lora, YaRN, dense + MoE layers, 2 MTP modules."""
    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_nextn_predict_layers=2,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=1024,
        rope=RopeConfig(theta=10000.0, kind="yarn", factor=4.0, original_max_position_embeddings=256,
                        beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        bos_token_id=0, eos_token_ids=(1,),
    )  # fmt: skip
    base.update(overrides)
    return ModelConfig(**base)


def deepseek_like(hidden: int, layers: int, vocab: int = 32000, experts: int = 16, mtp: int = 1, top_k: int = 4,
                  groups: int = 4) -> ModelConfig:  # fmt: skip
    """DeepSeek-V3 proportions at width `hidden` (a multiple of 64): 64-dim heads, q_lora 3H/8,
    kv_lora H/4, rope 32, top-`top_k` of `experts` routed experts in `groups` groups (half of them
    picked), one dense first layer."""
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
        moe_intermediate_size=hidden // 4, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        q_lora_rank=hidden * 3 // 8, kv_lora_rank=hidden // 4, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, num_nextn_predict_layers=mtp, n_routed_experts=experts, n_shared_experts=1,
        num_experts_per_tok=top_k, n_group=groups, topk_group=groups // 2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        max_position_embeddings=4096, bos_token_id=0, eos_token_ids=(1,),
    )  # fmt: skip


PRESETS = {
    "tiny": tiny_config,
    "small": lambda: deepseek_like(256, 4, vocab=4096),
    "1gb": lambda: deepseek_like(1024, 12),  # ~256M parameters, ~1 GB of fp32 weights
    # issue 16's memory checkpoint: ~1.8B parameters (7 GB as fp32), 64 experts top-8 in 8 groups
    "2b": lambda: deepseek_like(1280, 20, experts=64, top_k=8, groups=8),
}


def checkpoint_names(cfg: ModelConfig, mtp_copies: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `cfg` holds, trunk first, in DeepSeek's naming."""
    out = dict(trunk_shapes(cfg))
    for k in range(cfg.num_nextn_predict_layers):
        out.update(mtp_shapes(cfg, k))
        if mtp_copies:
            for own in MTP_SHARED:
                out[mtp_prefix(cfg, k) + own] = (cfg.vocab_size, cfg.hidden_size)
    return out


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """fp32 values for `name`, reproducible from (name, seed) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("e_score_correction_bias"):
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1:  # norm weights
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / shape[-1] ** 0.5


def is_fp8_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Which tensors DeepSeek stores in FP8: the 2-D projections of attention, MLPs and eh_proj."""
    return len(shape) == 2 and name.endswith(("proj.weight", "proj_with_mqa.weight"))


def write_random_checkpoint(
    out: str | Path,
    cfg: ModelConfig,
    *,
    seed: int = 0,
    weights: str = "float32",
    shard_bytes: int | None = None,
    style: str = "official",
    mtp_copies: bool = True,
) -> Path:
    """Write a random checkpoint of `cfg` to folder `out` (created) and return its path.

    weights: float32, bfloat16, float16, or fp8 (linear weights e4m3 with 128x128 block scales,
    the rest bfloat16). shard_bytes: split into shards of about this size with an index.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if weights == "fp8":
        cfg = dataclasses.replace(cfg, quant=cfg.quant or QuantConfig(), torch_dtype="bfloat16")
        store = torch.bfloat16
    else:
        cfg = dataclasses.replace(cfg, quant=None, torch_dtype=weights)
        store = WEIGHT_DTYPES[weights]
    names = checkpoint_names(cfg, mtp_copies)
    writer = _ShardWriter(out, shard_bytes)
    for name, shape in names.items():
        src = name  # MTP copies of embedding/head carry the trunk's values, as DeepSeek ships them
        for own in MTP_SHARED:
            if name.startswith("model.layers.") and name.endswith(own):
                src = trunk_twin(own, names)
        t = random_tensor(src, shape, seed)
        if name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
            writer.add(name, t)  # the router stays fp32
        elif cfg.quant is not None and is_fp8_weight(name, shape):
            q, s = quantize_fp8(t, cfg.quant.block)
            writer.add(name, q)
            writer.add(name + "_scale_inv", s)
        else:
            writer.add(name, t.to(store))
    files, weight_map = writer.close()

    if shard_bytes is not None:
        # Rename to the usual model-0000i-of-0000n names once the count is known.
        n = len(files)
        renamed = {}
        for i, f in enumerate(files, 1):
            new = f"model-{i:05d}-of-{n:05d}.safetensors"
            f.rename(out / new)
            renamed[f.name] = new
        index = {
            "metadata": {"total_size": sum((out / v).stat().st_size for v in renamed.values())},
            "weight_map": {k: renamed[v] for k, v in weight_map.items()},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, style), indent=2))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids), "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


class _ShardWriter:
    """Accumulates tensors and writes a safetensors file whenever the next would pass shard_bytes."""

    def __init__(self, out: Path, shard_bytes: int | None):
        self.out, self.shard_bytes = out, shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[Path] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        if self.shard_bytes is not None and self.current and self.size + t.nbytes > self.shard_bytes:
            self._save()
        self.current[name] = t.contiguous()
        self.size += t.nbytes

    def _save(self) -> None:
        sharded = self.shard_bytes is not None
        fname = f"model-{len(self.files) + 1:05d}.safetensors" if sharded else "model.safetensors"
        save_file(self.current, str(self.out / fname), metadata={"format": "pt"})
        self.files.append(self.out / fname)
        self.weight_map.update(dict.fromkeys(self.current, fname))
        self.current, self.size = {}, 0

    def close(self) -> tuple[list[Path], dict[str, str]]:
        self._save()
        return self.files, self.weight_map


def _main() -> None:
    import click

    @click.command()
    @click.argument("out", type=click.Path(file_okay=False))
    @click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True)
    @click.option("--weights", type=click.Choice([*WEIGHT_DTYPES, "fp8"]), default="float32", show_default=True)
    @click.option("--shard-mb", type=int, default=None, help="Split into shards of about this many MB.")
    @click.option("--seed", type=int, default=0, show_default=True)
    def cli(out: str, preset: str, weights: str, shard_mb: int | None, seed: int) -> None:
        """Write a random DeepSeek-V3-format checkpoint to OUT."""
        shard = shard_mb * 2**20 if shard_mb else None
        path = write_random_checkpoint(out, PRESETS[preset](), seed=seed, weights=weights, shard_bytes=shard)
        click.echo(str(path))

    cli()


if __name__ == "__main__":
    _main()
