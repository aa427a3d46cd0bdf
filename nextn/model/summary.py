"""What `nextn inspect CHECKPOINT` reports, computed from headers (and the shared-tensor check)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nextn.model.checkpoint import Checkpoint
from nextn.model.weights import MTP_SHARED, mtp_prefix, trunk_twin

_ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def summarize_checkpoint(path: str | Path) -> dict[str, Any]:
    """Config summary, parameter counts, dtypes, MTP depth and latent KV-cache size of a checkpoint.

    parameters:
      shared   the embedding and lm_head (one tensor when tied), used by the trunk and every MTP module
      trunk    the trunk's other parameters
      mtp[k]   MTP module k, without its embedding/head copies when they equal the trunk's
      trunk_active_per_token  trunk + shared, counting routed experts at num_experts_per_tok / n_routed_experts
    FP8 `weight_scale_inv` tensors are quantization metadata, not parameters (they count in bytes).
    """
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    L = cfg.num_hidden_layers
    shared_names = {"model.embed_tokens.weight", "lm_head.weight"}

    trunk = shared = routed = 0
    mtp = [0] * cfg.num_nextn_predict_layers
    dtypes: dict[str, dict[str, int]] = {}
    for name, info in ckpt.tensors.items():
        d = dtypes.setdefault(info.dtype, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += info.end - info.start
        if name.endswith("_scale_inv"):
            continue
        if name in shared_names:
            shared += info.numel
            continue
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        if layer >= L:
            k = layer - L
            own = name[len(mtp_prefix(cfg, k)) :]
            if own in MTP_SHARED and ckpt.same_data(name, trunk_twin(own, ckpt.tensors)):
                continue
            mtp[k] += info.numel
        else:
            trunk += info.numel
            if ".mlp.experts." in name:
                routed += info.numel
    ckpt.release()

    active = trunk + shared
    if cfg.n_routed_experts:
        active -= round(routed * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts))
    elem = _ELEM_BYTES.get(cfg.torch_dtype, 4)
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem * 1000
    moe_layers = [i for i in range(L) if cfg.is_moe_layer(i)]
    files = sorted({info.file for info in ckpt.tensors.values()})
    return {
        "path": str(Path(path)),
        "model_type": "deepseek_v3",
        "config": {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": L,
            "dense_layers": L - len(moe_layers),
            "moe_layers": len(moe_layers),
            "num_attention_heads": cfg.num_attention_heads,
            "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim,
            "n_routed_experts": cfg.n_routed_experts,
            "n_shared_experts": cfg.n_shared_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "n_group": cfg.n_group,
            "topk_group": cfg.topk_group,
            "rope": cfg.rope.kind if cfg.rope.kind != "yarn" else f"yarn x{cfg.rope.factor:g}",
            "max_position_embeddings": cfg.max_position_embeddings,
            "torch_dtype": cfg.torch_dtype,
            "quantization": None if cfg.quant is None else f"fp8 {cfg.quant.fmt} block {list(cfg.quant.block)}",
            "eos_token_ids": list(cfg.eos_token_ids),
        },
        "mtp_depth": cfg.num_nextn_predict_layers,
        "parameters": {
            "shared": shared,
            "trunk": trunk,
            "mtp": mtp,
            "total": shared + trunk + sum(mtp),
            "trunk_active_per_token": active,
        },
        "dtypes": dtypes,
        "kv_cache_bytes_per_1k_tokens": {
            "dtype": cfg.torch_dtype if cfg.torch_dtype in _ELEM_BYTES else "float32",
            "per_layer": per_layer,
            "trunk": per_layer * L,
            "mtp": [per_layer] * cfg.num_nextn_predict_layers,
        },
        "files": {"count": len(files), "bytes": sum(f.stat().st_size for f in files)},
        "tokenizer": ckpt.tokenizer_file is not None,
    }
