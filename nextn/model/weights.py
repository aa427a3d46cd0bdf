"""Which tensors a DeepSeek-V3 checkpoint must hold, and loading them into the reference model.

The expected names and shapes follow from the config alone, so a checkpoint is validated from its
safetensors headers before any data is read.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from nextn.errors import NextnError
from nextn.model.config import ModelConfig

log = logging.getLogger(__name__)

# An MTP module's own copies of the embedding and head: optional (transformers and several
# converters drop them; DeepSeek ships them identical to the trunk's), shared when identical.
MTP_SHARED = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def trunk_twin(own: str, names) -> str:
    """The trunk tensor an MTP module's own `embed_tokens` / `shared_head.head` copy duplicates
    (the embedding stands in for lm_head when the head is tied and absent)."""
    name = MTP_SHARED[own]
    return name if name in names else "model.embed_tokens.weight"


# Router tensors stay fp32 whatever the model dtype (as in transformers and DeepSeek's inference code).
FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


def _mlp(prefix: str, h: int, inner: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.gate_proj.weight": (inner, h),
        f"{prefix}.up_proj.weight": (inner, h),
        f"{prefix}.down_proj.weight": (h, inner),
    }


def block_shapes(cfg: ModelConfig, index: int, prefix: str) -> dict[str, tuple[int, ...]]:
    """Tensors of one decoder block (attention + dense MLP or MoE) under `prefix`."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    a = f"{prefix}.self_attn"
    out: dict[str, tuple[int, ...]] = {
        f"{prefix}.input_layernorm.weight": (h,),
        f"{prefix}.post_attention_layernorm.weight": (h,),
        f"{a}.kv_a_proj_with_mqa.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
        f"{a}.kv_a_layernorm.weight": (cfg.kv_lora_rank,),
        f"{a}.kv_b_proj.weight": (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        f"{a}.o_proj.weight": (h, nh * cfg.v_head_dim),
    }
    if cfg.q_lora_rank is None:
        out[f"{a}.q_proj.weight"] = (nh * cfg.qk_head_dim, h)
    else:
        out[f"{a}.q_a_proj.weight"] = (cfg.q_lora_rank, h)
        out[f"{a}.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        out[f"{a}.q_b_proj.weight"] = (nh * cfg.qk_head_dim, cfg.q_lora_rank)
    if cfg.is_moe_layer(index):
        e = cfg.n_routed_experts
        out[f"{prefix}.mlp.gate.weight"] = (e, h)
        out[f"{prefix}.mlp.gate.e_score_correction_bias"] = (e,)
        for j in range(e):
            out.update(_mlp(f"{prefix}.mlp.experts.{j}", h, cfg.moe_intermediate_size))
        if cfg.n_shared_experts:
            out.update(_mlp(f"{prefix}.mlp.shared_experts", h, cfg.moe_intermediate_size * cfg.n_shared_experts))
    else:
        out.update(_mlp(f"{prefix}.mlp", h, cfg.intermediate_size))
    return out


def trunk_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    v, h = cfg.vocab_size, cfg.hidden_size
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    for i in range(cfg.num_hidden_layers):
        out.update(block_shapes(cfg, i, f"model.layers.{i}"))
    return out


def mtp_shapes(cfg: ModelConfig, k: int) -> dict[str, tuple[int, ...]]:
    """Required tensors of MTP module k (its optional embed/head copies are in MTP_SHARED)."""
    i = cfg.num_hidden_layers + k
    p, h = f"model.layers.{i}", cfg.hidden_size
    out = block_shapes(cfg, i, p)
    out.update({
        f"{p}.enorm.weight": (h,),
        f"{p}.hnorm.weight": (h,),
        f"{p}.eh_proj.weight": (h, 2 * h),
        f"{p}.shared_head.norm.weight": (h,),
    })  # fmt: skip
    return out


def mtp_prefix(cfg: ModelConfig, k: int) -> str:
    return f"model.layers.{cfg.num_hidden_layers + k}."


def validate_tensors(cfg: ModelConfig, tensors: dict) -> ModelConfig:
    """Check names, shapes and FP8 scales against the config; return the config with the MTP depth
    the checkpoint really carries (a module whose tensors are all absent counts as not shipped)."""
    present = cfg.num_nextn_predict_layers
    for k in range(cfg.num_nextn_predict_layers):
        if not any(n.startswith(mtp_prefix(cfg, k)) for n in tensors):
            present = k
            log.warning(
                "config.json declares %d MTP module(s) but the checkpoint has none from model.layers.%d on",
                cfg.num_nextn_predict_layers, cfg.num_hidden_layers + k,
            )  # fmt: skip
            break
    cfg = dataclasses.replace(cfg, num_nextn_predict_layers=present)

    expected = trunk_shapes(cfg)
    optional: dict[str, tuple[int, ...]] = {}
    if cfg.tie_word_embeddings:
        optional["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for k in range(present):
        expected.update(mtp_shapes(cfg, k))
        for own in MTP_SHARED:
            optional[mtp_prefix(cfg, k) + own] = (cfg.vocab_size, cfg.hidden_size)

    for name in sorted(expected):
        if name not in tensors:
            raise NextnError(f"missing tensor {name} (expected shape {list(expected[name])})")
    for name, info in tensors.items():
        if name.endswith("_scale_inv"):
            base = name[: -len("_scale_inv")]
            if base not in tensors or tensors[base].dtype != "F8_E4M3":
                raise NextnError(f"{info.file}: scale tensor {name} has no FP8 weight {base}")
            continue
        shape = expected.get(name, optional.get(name))
        if shape is None:
            raise NextnError(f"{info.file}: unexpected tensor {name}")
        if info.shape != shape:
            raise NextnError(f"{info.file}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}")
        if info.dtype == "F8_E4M3":
            _check_fp8(cfg, name, info, tensors)
        elif info.dtype not in ("F32", "BF16", "F16"):
            raise NextnError(f"{info.file}: tensor {name} has dtype {info.dtype}, expected a float type")
    return cfg


def _check_fp8(cfg: ModelConfig, name: str, info, tensors: dict) -> None:
    if cfg.quant is None:
        raise NextnError(f"{info.file}: tensor {name} is FP8 but config.json has no quantization_config")
    if len(info.shape) != 2:
        raise NextnError(f"{info.file}: FP8 tensor {name} must be 2-D, has shape {list(info.shape)}")
    scale = tensors.get(name + "_scale_inv")
    if scale is None:
        raise NextnError(f"{info.file}: FP8 tensor {name} has no {name}_scale_inv")
    bn, bk = cfg.quant.block
    want = (-(-info.shape[0] // bn), -(-info.shape[1] // bk))
    if scale.shape != want:
        raise NextnError(f"{scale.file}: tensor {name}_scale_inv has shape {list(scale.shape)}, expected {list(want)}")


# -- loading ---------------------------------------------------------------------------------------
def param_name(cfg: ModelConfig, name: str) -> str:
    """Checkpoint name -> parameter name in `DeepseekV3` (MTP modules move to `mtp.{k}.`)."""
    if name.startswith("model.layers."):
        i = int(name.split(".")[2])
        if i >= cfg.num_hidden_layers:
            return f"mtp.{i - cfg.num_hidden_layers}." + name.split(".", 3)[3]
    return name


def _assign(model: nn.Module, path: str, tensor: torch.Tensor) -> None:
    owner_path, _, attr = path.rpartition(".")
    owner = model.get_submodule(owner_path)
    setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))


def _expert_slot(model: nn.Module, target: str, dtype: torch.dtype) -> torch.Tensor | None:
    """The view of its MoE's stacked tensors (`MoE.stacked_slot`) that routed expert weight `target`
    (`...mlp.experts.{e}.{gate,up,down}_proj.weight`) lives in, else None."""
    from nextn.model.reference import MoE

    head, sep, tail = target.partition(".mlp.experts.")
    if not sep:
        return None
    moe = model.get_submodule(head + ".mlp")
    if not isinstance(moe, MoE):
        return None
    e, proj = tail.split(".")[:2]
    return moe.stacked_slot(int(e), proj, dtype)


def wanted_names(ckpt, n_mtp: int, private: set[tuple[int, str]]) -> list[str]:
    """The checkpoint tensors a model with `n_mtp` MTP modules is built from, in file order: FP8 scales
    (read with their weights), modules past `n_mtp`, an MTP module's embed/head copies that duplicate
    the trunk's (not in `private`) and a tied head are left out."""
    cfg, out = ckpt.config, []
    for _, names in ckpt.names_by_file():
        for name in names:
            if name.endswith("_scale_inv") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            target = param_name(cfg, name)
            if target.startswith("mtp."):
                k = int(target.split(".")[1])
                own = name[len(mtp_prefix(cfg, k)) :]
                if k >= n_mtp or (own in MTP_SHARED and (k, own) not in private):
                    continue
            out.append(name)
    return out


def layer_groups(names: list[str]) -> dict[int | str, list[str]]:
    """Checkpoint tensor names by what loads together a layer at a time: `model.layers.{i}.*` under i (an
    MTP module's under num_hidden_layers + k), the rest (embedding, final norm, head) under "top"."""
    groups: dict[int | str, list[str]] = {}
    for name in names:
        groups.setdefault(int(name.split(".")[2]) if name.startswith("model.layers.") else "top", []).append(name)
    return groups


def skeleton(ckpt, n_mtp: int, absorbed: bool, dtype: torch.dtype = torch.float32):
    """The reference `DeepseekV3` on the meta device (shapes and dtypes as `load_model` gives them at
    `dtype`, no data), its MTP modules' embedding and head shared with the trunk's unless the
    checkpoint's own copies differ; returns (model, private), `private` the (k, name) of the copies that
    differ (DeepSeek ships them identical)."""
    from nextn.model.reference import DeepseekV3

    cfg = ckpt.config
    if n_mtp > cfg.num_nextn_predict_layers:
        raise NextnError(f"--mtp-layers {n_mtp}: {ckpt.path} has only {cfg.num_nextn_predict_layers} MTP module(s)")
    private: set[tuple[int, str]] = set()
    for k in range(n_mtp):
        for own in MTP_SHARED:
            name = mtp_prefix(cfg, k) + own
            if name in ckpt.tensors and not ckpt.same_data(name, trunk_twin(own, ckpt.tensors)):
                log.info("%s differs from %s: MTP module %d keeps its own copy", name, trunk_twin(own, ckpt.tensors), k)
                private.add((k, own))
    with torch.device("meta"):
        model = DeepseekV3(cfg, num_mtp=n_mtp, absorbed=absorbed)
        for k, own in private:
            if own.startswith("embed"):
                model.mtp[k].embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            else:
                model.mtp[k].shared_head.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if name.endswith(FP32_SUFFIXES) else dtype)
    share(model, private)
    return model.eval(), private


def share(model, private: set[tuple[int, str]]) -> None:
    """Point the tied head and the MTP modules' shared embedding/head at the trunk's (again after a
    load replaced the trunk's parameters)."""
    if model.cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for k, module in enumerate(model.mtp):
        if (k, "embed_tokens.weight") not in private:
            module.embed_tokens = model.model.embed_tokens
        if (k, "shared_head.head.weight") not in private:
            module.shared_head.head = model.lm_head


def unload(module: nn.Module, keep: tuple[nn.Module, ...] = ()) -> None:
    """Every parameter of `module` back on the meta device and the experts' stacks dropped: the memory of
    what `load_tensors` gave it is released (views of the checkpoint's files let go of their pages). A
    whole model then needs `share` again. `keep`: submodules left loaded (an MTP module's embedding and
    head, which are the trunk's)."""
    for m in module.modules():
        if any(m is k for k in keep):
            continue
        for n, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                m._parameters[n] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for n in ("fused_w13", "fused_w2"):  # MoE.stacked_slot's buffers
            if n in m._buffers and not m._buffers[n].is_meta:
                del m._buffers[n]
    trim_heap()


def trim_heap() -> None:
    """Hand freed heap memory back to the system. glibc keeps freed blocks below its (self-raising, up to
    32 MiB) mmap threshold in the heap; a layer's tensors are such blocks, and without this the process
    would keep the largest layer's worth of pages after dropping it."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def load_tensors(model, ckpt, names, dtype: torch.dtype, stack_experts: bool = False) -> None:
    """Give the parameters that checkpoint tensors `names` feed their data (in `dtype`, routers fp32).

    Tensors already in `dtype` are zero-copy views of the memory-mapped files; others are converted
    (FP8 dequantized) one at a time. `stack_experts`: routed expert weights are copied into their MoE's
    stacks (`MoE.stacked_slot`) and become views of them, the file pages dropped as each is copied.
    """
    cfg = ckpt.config
    for name in names:
        target = param_name(cfg, name)
        want = torch.float32 if name.endswith(FP32_SUFFIXES) else dtype
        slot = _expert_slot(model, target, want) if stack_experts else None
        if slot is not None:
            slot.copy_(ckpt.get(name, want))
            ckpt.drop_pages(name)
            _assign(model, target, slot)
        else:
            _assign(model, target, ckpt.get(name, want))


def partial_model(ckpt, n_mtp: int, absorbed: bool, dtype: torch.dtype, keep: Callable[[str], bool] = lambda n: True,
                  stack_experts: bool = False):  # fmt: skip
    """The reference with the checkpoint tensors `keep` selects loaded, one file at a time; the rest
    stay on the meta device (enough to run the parts the kept tensors make up)."""
    from nextn.model.reference import Rotary

    model, private = skeleton(ckpt, n_mtp, absorbed, dtype)
    model.rotary = Rotary(ckpt.config)  # its buffer is computed, not loaded: build it on the CPU
    wanted = {n for n in wanted_names(ckpt, n_mtp, private) if keep(n)}
    for _, names in ckpt.names_by_file():
        load_tensors(model, ckpt, [n for n in names if n in wanted], dtype, stack_experts)
        ckpt.release()  # unconverted tensors keep their shard mapped; the rest of it can go
    share(model, private)
    return model


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    mtp_layers: int | None = None,
    absorbed: bool = False,
    stack_experts: bool = False,
):
    """Load a checkpoint folder into the reference `DeepseekV3` (eval mode, no grad).

    Peak memory stays near one copy of the weights at `dtype` (see `load_tensors`). `stack_experts`
    (for the fused MoE export): every MoE's routed expert weights live in two stacked tensors,
    `fused_w13` [E, 2I, H] (gate/up rows interleaved) and `fused_w2` [E, H, I], buffers of the MoE
    module, and each expert's parameters are views of them: the stacks are the only copy.
    """
    from nextn.model.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    cfg = ckpt.config
    n_mtp = cfg.num_nextn_predict_layers if mtp_layers is None else mtp_layers
    model = partial_model(ckpt, n_mtp, absorbed, dtype, stack_experts=stack_experts)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # validation should make this impossible
        raise NextnError(f"{path}: no data for parameter {leftover[0]}")
    return model, cfg
