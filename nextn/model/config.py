"""Typed configuration of a DeepSeek-V3-style checkpoint, parsed from its `config.json`.

Both config styles in the wild are read:
- the official one: `rope_theta` + `rope_scaling` {type: yarn, factor, original_max_position_embeddings,
  beta_fast, beta_slow, mscale, mscale_all_dim} (or null);
- the transformers >= 5 one: `rope_parameters` {rope_type, rope_theta, factor, ...}.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nextn.errors import NextnError


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the decoupled `qk_rope_head_dim` part of MLA."""

    theta: float = 10000.0
    kind: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # explicit cos/sin scale; derived from mscale when None
    truncate: bool = True

    @staticmethod
    def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    def cos_sin_scale(self) -> float:
        """Factor on cos/sin (transformers' `attention_scaling`; 1.0 for DeepSeek-V3's mscale = mscale_all_dim)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self.yarn_mscale(self.factor, self.mscale) / self.yarn_mscale(self.factor, self.mscale_all_dim)
        return self.yarn_mscale(self.factor)

    def softmax_scale_factor(self) -> float:
        """Factor on 1/sqrt(qk_head_dim): YaRN's mscale(factor, mscale_all_dim) squared."""
        if self.kind == "yarn" and self.mscale_all_dim:
            m = self.yarn_mscale(self.factor, self.mscale_all_dim)
            return m * m
        return 1.0


@dataclass(frozen=True)
class QuantConfig:
    """FP8 block quantization as DeepSeek ships it: e4m3 weights with one fp32 `weight_scale_inv` per block."""

    method: str = "fp8"
    fmt: str = "e4m3"
    block: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP
    moe_intermediate_size: int  # one routed or shared expert
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    num_nextn_predict_layers: int = 0
    n_routed_experts: int | None = None  # None: every layer is dense
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"  # activation dtype the checkpoint was made for
    quant: QuantConfig | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * self.rope.softmax_scale_factor()

    def is_moe_layer(self, index: int) -> bool:
        """DeepSeek's rule; MTP module k sits at index num_hidden_layers + k and follows it too."""
        return (
            self.n_routed_experts is not None
            and index >= self.first_k_dense_replace
            and index % self.moe_layer_freq == 0
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict` (used by manifests)."""
        d = dict(d)
        d["rope"] = RopeConfig(**d["rope"])
        if d.get("quant") is not None:
            q = dict(d["quant"])
            q["block"] = tuple(q["block"])
            d["quant"] = QuantConfig(**q)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)  # fmt: skip


def _rope_from_hf(raw: dict[str, Any], where: str) -> RopeConfig:
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise NextnError(f"{where}: rope_parameters must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise NextnError(f"{where}: rope_scaling must be an object or null, got {scaling!r}")
    p: dict[str, Any] = dict(params or scaling or {})
    theta = float(p.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default" or not p:
        return RopeConfig(theta=theta)
    if kind != "yarn":
        raise NextnError(f"{where}: unsupported rope type {kind!r} (nextn reads 'default' and 'yarn')")
    max_pos = int(raw.get("max_position_embeddings", 4096))
    orig = int(p.get("original_max_position_embeddings", raw.get("original_max_position_embeddings", max_pos)))
    factor = p.get("factor")
    factor = float(factor) if factor is not None else max_pos / orig
    af = p.get("attention_factor")
    return RopeConfig(
        theta=theta,
        kind="yarn",
        factor=factor,
        original_max_position_embeddings=orig,
        beta_fast=float(p.get("beta_fast") or 32),
        beta_slow=float(p.get("beta_slow") or 1),
        mscale=float(p.get("mscale") or 0.0),
        mscale_all_dim=float(p.get("mscale_all_dim") or 0.0),
        attention_factor=float(af) if af is not None else None,
        truncate=bool(p.get("truncate", True)),
    )


def _quant_from_hf(raw: dict[str, Any], where: str) -> QuantConfig | None:
    q = raw.get("quantization_config")
    if q is None:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise NextnError(f"{where}: unsupported quantization_config.quant_method {method!r} (nextn reads 'fp8')")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise NextnError(f"{where}: unsupported fp8 format {fmt!r} (nextn reads 'e4m3')")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise NextnError(f"{where}: quantization_config.weight_block_size must be two positive ints, got {block!r}")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise NextnError(f"{where}: unsupported fp8 activation_scheme {q.get('activation_scheme')!r}")
    return QuantConfig(method="fp8", fmt="e4m3", block=(block[0], block[1]))


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def config_from_hf(raw: dict[str, Any], where: str = "config.json", generation: dict | None = None) -> ModelConfig:
    """Parse a Hugging Face DeepSeek-V3 `config.json` dict (and optional generation_config.json)."""
    model_type = raw.get("model_type")
    if model_type != "deepseek_v3":
        raise NextnError(f"{where}: unknown model_type {model_type!r} (nextn reads 'deepseek_v3')")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise NextnError(f"{where}: missing required field {missing[0]!r}")
    if raw.get("hidden_act", "silu") != "silu":
        raise NextnError(f"{where}: unsupported hidden_act {raw['hidden_act']!r} (nextn reads 'silu')")
    if raw.get("attention_bias", False):
        raise NextnError(f"{where}: attention_bias=true is not supported (DeepSeek-V3 has none)")
    if raw.get("scoring_func", "sigmoid") != "sigmoid":
        raise NextnError(f"{where}: unsupported scoring_func {raw['scoring_func']!r} (DeepSeek-V3 uses 'sigmoid')")
    n_kv = raw.get("num_key_value_heads")
    if n_kv is not None and n_kv != raw["num_attention_heads"]:
        raise NextnError(f"{where}: num_key_value_heads={n_kv} differs from num_attention_heads (not MLA as in V3)")
    n_routed = raw.get("n_routed_experts")
    n_group = raw.get("n_group") or 1
    if n_routed is not None and n_routed % n_group != 0:
        raise NextnError(f"{where}: n_routed_experts={n_routed} is not a multiple of n_group={n_group}")
    mtp = raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers", 0)) or 0
    gen = generation or {}
    eos = _eos_ids(gen.get("eos_token_id", raw.get("eos_token_id")))
    dtype = raw.get("torch_dtype", raw.get("dtype")) or "float32"
    return ModelConfig(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        moe_intermediate_size=int(raw.get("moe_intermediate_size") or raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=int(raw["num_attention_heads"]),
        kv_lora_rank=int(raw["kv_lora_rank"]),
        qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
        qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
        v_head_dim=int(raw["v_head_dim"]),
        q_lora_rank=int(raw["q_lora_rank"]) if raw.get("q_lora_rank") else None,
        num_nextn_predict_layers=int(mtp),
        n_routed_experts=int(n_routed) if n_routed else None,
        n_shared_experts=int(raw.get("n_shared_experts") or 0),
        num_experts_per_tok=int(raw.get("num_experts_per_tok") or 1),
        n_group=int(n_group),
        topk_group=int(raw.get("topk_group") or 1),
        first_k_dense_replace=int(raw.get("first_k_dense_replace") or 0),
        moe_layer_freq=int(raw.get("moe_layer_freq") or 1),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        rope=_rope_from_hf(raw, where),
        rope_interleave=bool(raw.get("rope_interleave", True)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        torch_dtype=str(dtype),
        quant=_quant_from_hf(raw, where),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos,
    )


def read_config(directory: Path) -> ModelConfig:
    """Read `config.json` (and `generation_config.json` when present) from a checkpoint folder."""
    path = directory / "config.json"
    if not directory.is_dir():
        raise NextnError(f"{directory}: not a checkpoint folder")
    if not path.is_file():
        raise NextnError(f"{path}: missing (a checkpoint folder needs config.json)")
    raw = _read_json(path)
    gen_path = directory / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else None
    return config_from_hf(raw, where=str(path), generation=gen)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NextnError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise NextnError(f"{path}: expected a JSON object")
    return value


def config_to_hf(cfg: ModelConfig, style: str = "official") -> dict[str, Any]:
    """A `config.json` dict for `cfg`, in DeepSeek's official style or the transformers >= 5 one."""
    raw: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
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
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "moe_layer_freq": cfg.moe_layer_freq,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_interleave": cfg.rope_interleave,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "torch_dtype": cfg.torch_dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids) or None,
    }
    r = cfg.rope
    rope: dict[str, Any] | None = None
    if r.kind == "yarn":
        rope = {
            "factor": r.factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
            "beta_fast": r.beta_fast,
            "beta_slow": r.beta_slow,
            "mscale": r.mscale,
            "mscale_all_dim": r.mscale_all_dim,
        }
        if r.attention_factor is not None:
            rope["attention_factor"] = r.attention_factor
    if style == "official":
        raw["rope_theta"] = r.theta
        raw["rope_scaling"] = None if rope is None else {"type": "yarn", **rope}
    elif style == "hf":
        raw["rope_parameters"] = {"rope_type": r.kind, "rope_theta": r.theta, **(rope or {})}
    else:
        raise ValueError(f"unknown config style {style!r}")
    if cfg.quant is not None:
        raw["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": cfg.quant.fmt,
            "activation_scheme": "dynamic",
            "weight_block_size": list(cfg.quant.block),
        }
    return raw
