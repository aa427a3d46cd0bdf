"""`nextn inspect CHECKPOINT --plan`: what exporting, quantizing and decoding a checkpoint will take, from
its config alone (no weights read).

Per scheme nextn writes (fp32 / bf16 exports, int8 and int4 calibrations), from the tensor shapes the
config implies (model/weights.py) and the forms calibrate writes (calib/rewrite.py):

    fp32, bf16   every tensor at 4 / 2 bytes
    int8         linears int8 with an fp32 scale and a zero point per output channel (Q/DQ); experts QMoE 8-bit,
                 an fp32 scale and a uint8 zero point per block of 64 input channels (or the largest
                 smaller block dividing the widths)
    int4         linears MatMulNBits 4-bit per block of 64 (fp32 scale, 4-bit zero point, the last block
                 padded), the output head 8-bit; routed experts QMoE 4-bit per block
    all          the embedding, norms, the MoE router and kv_b_proj (MLA's absorbed W_UK / W_UV) stay fp32
                 (bf16 in a bf16 export); int8 and int4 round kv_b_proj to bf16 values, which the runtime's
                 attention kernel reads in 2 bytes (a bf16 checkpoint's fp32 export is read the same way,
                 bench/floor.py counts it from the stored values; this plan, from the config, does not)

Bytes one decoded token reads: the trunk's weights with routed experts at top_k / n_routed and the
embedding at one row (bench/floor.py counts the same from a stored graph). The decode floor is those bytes
over a read bandwidth. Peak memory and disk follow what was measured (BENCHMARKS.md): the streamed export
holds a group of layers at a time; its peak is the runtime (~0.6 GB) plus one to two copies of what its
truncated validation holds (embedding, head, the first dense and MoE layers; 1.38 GB measured for the 1.8B
FP8 checkpoint, 7.2 GB of fp32 weights) and it writes the graphs' data and weights.bin beside the output
(twice the artifact on disk). `export --quantize` writes no fp32 weights (the graphs refer to the
checkpoint's): it rewrites a tensor at a time and takes int8 ranges a layer at a time; its peak is the
report running the quantized graphs as `nextn run` does (ONNX Runtime's pre-packed copies: ~1.4x the int4
bytes, ~REPORT_RSS["int8"] the int8 bytes), and on disk the quantized output twice (graphs' .data, then
weights.bin) with the embedding and head once more per MTP graph, or what validation writes (the truncated
twin and one MTP graph in fp32) if that is more. Checked against real artifacts of the 1 GB
preset: sizes and bytes per token within 0.2% at every scheme (tests check the tiny model the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nextn.model.config import ModelConfig

BLOCK = 64  # int4 / QMoE block size (calibrate's default)
RUNTIME_RSS = 0.6e9  # torch, onnxscript and ONNX Runtime loaded, before any weight (measured)
EXPORT_GROUP_RSS = (1.0, 2.0)  # the streamed export's peak over RUNTIME_RSS, in validation groups (see above)
REPORT_RSS = {  # export --quantize: its report's ONNX Runtime session over the quantized bytes (pre-packed
    "int4": 1.4,  # copies; the mapped originals dropped as they are packed; 2b preset: 2.34 GB peak for 1.25 GB)
    "int8": 1.3,  # 2b preset: 3.13 GB peak for 2.09 GB; 1 GB preset: 1.20 GB for 0.41 GB (1.77 GB with fp32 probes)
}


@dataclass(frozen=True)
class Scheme:
    name: str
    float_bytes: int  # of what stays float: 4, or 2 in a bf16 export
    linear_bits: int | None  # None: float; 8: int8 Q/DQ per output channel; 4: MatMulNBits blocks
    head_bits: int | None
    expert_bits: int | None  # QMoE blocks


SCHEMES = {
    "fp32": Scheme("fp32", 4, None, None, None),
    "bf16": Scheme("bf16", 2, None, None, None),
    "int8": Scheme("int8", 4, 8, 8, 8),
    "int4": Scheme("int4", 4, 4, 8, 4),
}


def category(name: str, shape: tuple[int, ...]) -> str:
    if len(shape) == 1 or name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
        return "other"  # norms, biases, the router (its top-k choice must not flip)
    if "embed_tokens" in name or "kv_b_proj" in name:
        return "other"
    if name.endswith("lm_head.weight") or name.endswith("shared_head.head.weight"):
        return "head"
    return "expert" if ".mlp.experts." in name else "linear"


def _blocks(n: int, k: int, bits: int, block: int) -> float:
    """[n, k] in `bits` per block of `block` input channels: packed weights, an fp32 scale and a
    `bits`-wide zero point per block (the last block padded)."""
    per_row = math.ceil(k / block)
    return n * (per_row * block * bits / 8 + per_row * 4 + math.ceil(per_row * bits / 8))


def expert_block(cfg: ModelConfig) -> int:
    """QMoE has no padded last block: the largest block <= BLOCK dividing hidden and expert widths."""
    return next((b for b in (BLOCK, 32, 16) if cfg.hidden_size % b == 0 and cfg.moe_intermediate_size % b == 0),
                BLOCK)  # fmt: skip


def tensor_bytes(scheme: Scheme, cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> float:
    kind = category(name, shape)
    bits = {"linear": scheme.linear_bits, "head": scheme.head_bits, "expert": scheme.expert_bits}.get(kind)
    n, k = (shape[0], shape[1]) if len(shape) == 2 else (1, math.prod(shape))  # [out, in]
    if bits is None:
        return math.prod(shape) * scheme.float_bytes
    if kind == "expert":
        return _blocks(n, k, bits, expert_block(cfg))
    if bits == 8 and scheme.linear_bits == 8:
        return n * k + n * 5  # int8 Q/DQ: an fp32 scale and an int8 zero point per output channel
    return _blocks(n, k, bits, BLOCK)


def tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an artifact stores: the trunk and each MTP module (embedding and head shared)."""
    from nextn.model.weights import mtp_shapes, trunk_shapes

    out = dict(trunk_shapes(cfg))
    for k in range(cfg.num_nextn_predict_layers):
        out.update(mtp_shapes(cfg, k))
    return out


def _validation_group(cfg: ModelConfig, name: str) -> bool:
    """Whether trunk tensor `name` is in what a streamed export's truncated validation holds: the embedding,
    norm and head, and the layers of its truncated trunk (the first dense and the first MoE layer)."""
    if not name.startswith("model.layers."):
        return True
    return int(name.split(".")[2]) <= cfg.first_k_dense_replace


def plan(cfg: ModelConfig, bandwidth_gbs: float, context: int = 4096) -> dict:
    """Sizes per scheme, KV-cache bytes per token and the decode floor at `bandwidth_gbs`."""
    from nextn.model.weights import trunk_shapes

    all_t, trunk_t = tensors(cfg), trunk_shapes(cfg)
    share = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 1.0
    params = sum(math.prod(s) for s in all_t.values())
    kv_elem = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    # what validation writes in fp32 when quantizing (the truncated twin's layers): the same for every scheme
    fp32_group = sum(tensor_bytes(SCHEMES["fp32"], cfg, n, s) for n, s in trunk_t.items() if _validation_group(cfg, n))
    out = {"parameters": params, "trunk_parameters": sum(math.prod(s) for s in trunk_t.values()),
           "bandwidth_gbs": bandwidth_gbs, "context": context, "schemes": {}}  # fmt: skip
    for name, sch in SCHEMES.items():
        size = sum(tensor_bytes(sch, cfg, n, s) for n, s in all_t.items())
        read = 0.0
        for n, s in trunk_t.items():
            b = tensor_bytes(sch, cfg, n, s) / (2 if name in ("int8", "int4") and "kv_b_proj" in n else 1)
            read += b * share if ".mlp.experts." in n else b / cfg.vocab_size if "embed_tokens" in n else b
        kv_bytes = kv_elem * (2 if name == "bf16" else 4)
        quantized = name in ("int8", "int4")
        group = sum(tensor_bytes(sch, cfg, n, s) for n, s in trunk_t.items() if _validation_group(cfg, n))
        shared = sum(tensor_bytes(sch, cfg, n, s) for n, s in trunk_t.items() if category(n, s) == "head"
                     or "embed_tokens" in n)  # each MTP graph's .data holds them again until packed  # fmt: skip
        out["schemes"][name] = {
            "artifact_bytes": int(size),
            # streamed export (fp32, bf16), or the streamed fp32 export then calibrate (int8, int4)
            "peak_rss_bytes": ([int(RUNTIME_RSS + group * f) for f in EXPORT_GROUP_RSS] if not quantized
                               else [int(RUNTIME_RSS + max(group * f, REPORT_RSS[name] * size)) for f in EXPORT_GROUP_RSS]),  # fmt: skip
            # a graph's data, then weights.bin beside it (quantizing: no fp32 weights but validation's copies)
            "disk_bytes": int(2 * size if not quantized
                              else max(2 * size + shared * cfg.num_nextn_predict_layers, 2 * fp32_group)),
            "kv_bytes_per_token": kv_bytes,
            "read_bytes_per_token": int(read + kv_bytes * context),  # weights + the cache at `context`
            "decode_floor_ms": (read + kv_bytes * context) / (bandwidth_gbs * 1e9) * 1e3,
        }
    return out
