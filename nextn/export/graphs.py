"""The exported graphs' interfaces: thin nn.Module wrappers over the reference with flat, named I/O
(the names and output order: io.py, the one definition every caller uses).

trunk.onnx
  inputs   input_ids       [batch, new_tokens]                int64
           position_ids    [batch, new_tokens]                int64
           attention_mask  [batch, total_len]                 int64   1 = a real token; total_len = past_len + new_tokens
           past.{i}.c_kv   [batch, past_len, kv_lora_rank]    dtype   for each trunk layer i
           past.{i}.k_pe   [batch, past_len, qk_rope_head_dim]
  outputs  logits          [batch, new_tokens, vocab]
           hidden          [batch, new_tokens, hidden]        after the final norm: MTP module 0's input
           new.{i}.c_kv    [batch, new_tokens, kv_lora_rank]  only the new entries (the caller owns the cache)
           new.{i}.k_pe    [batch, new_tokens, qk_rope_head_dim]

mtp_{k}.onnx
  inputs   input_ids [batch, new_tokens] (tokens one step ahead), hidden [batch, new_tokens, hidden],
           position_ids, attention_mask, past.c_kv, past.k_pe,
           output_rows [batch, output_rows] int64: the rows whose outputs are wanted (indices into new_tokens)
  outputs  logits [batch, output_rows, vocab], hidden_out [batch, output_rows, hidden] (chained to depth k+1),
           new.c_kv, new.k_pe [batch, new_tokens, ...]: every row's cache entry
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nextn.export import io
from nextn.model.config import ModelConfig
from nextn.model.reference import DeepseekV3, LayerKV

# Symbolic dimension names written into the graphs and the manifest.
BATCH, NEW, PAST, TOTAL, ROWS = "batch", "new_tokens", "past_len", "total_len", "output_rows"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64", "float32", "float16", "bfloat16"
    shape: tuple[str | int, ...]
    meaning: str

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "meaning": self.meaning}


def _kv_specs(names: tuple[str, str], cfg: ModelConfig, dtype: str, length: str, what: str) -> list[TensorSpec]:
    return [
        TensorSpec(names[0], dtype, (BATCH, length, cfg.kv_lora_rank), f"{what} latent c_kv (after kv_a_layernorm)"),
        TensorSpec(names[1], dtype, (BATCH, length, cfg.qk_rope_head_dim), f"{what} rotated rope key"),
    ]


def trunk_io(cfg: ModelConfig, dtype: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [
        TensorSpec(io.INPUT_IDS, "int64", (BATCH, NEW), "new tokens"),
        TensorSpec(io.POSITION_IDS, "int64", (BATCH, NEW), "their positions"),
        TensorSpec(io.ATTENTION_MASK, "int64", (BATCH, TOTAL), "1 for real tokens over past + new slots"),
    ]
    outputs = [
        TensorSpec(io.LOGITS, dtype, (BATCH, NEW, cfg.vocab_size), "next-token logits"),
        TensorSpec(io.HIDDEN, dtype, (BATCH, NEW, cfg.hidden_size), "hidden after the final norm (MTP input)"),
    ]
    for i in range(cfg.num_hidden_layers):
        inputs += _kv_specs(io.past(i), cfg, dtype, PAST, f"layer {i} past")
        outputs += _kv_specs(io.new(i), cfg, dtype, NEW, f"layer {i} new")
    assert [o.name for o in outputs] == io.trunk_outputs(cfg.num_hidden_layers)
    return inputs, outputs


def mtp_io(cfg: ModelConfig, dtype: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [
        TensorSpec(io.INPUT_IDS, "int64", (BATCH, NEW), "tokens one step ahead of hidden's positions"),
        TensorSpec(io.HIDDEN, dtype, (BATCH, NEW, cfg.hidden_size), "trunk hidden (k = 0) or depth k-1 hidden_out"),
        TensorSpec(io.POSITION_IDS, "int64", (BATCH, NEW), "positions of input_ids"),
        TensorSpec(io.ATTENTION_MASK, "int64", (BATCH, TOTAL), "1 for real tokens over past + new slots"),
        *_kv_specs(io.past(), cfg, dtype, PAST, "past"),
        TensorSpec(io.OUTPUT_ROWS, "int64", (BATCH, ROWS), "rows (into new_tokens) whose logits and hidden_out are "
                   "computed; the last module's catch-up wants its last row only"),
    ]
    outputs = [
        TensorSpec(io.LOGITS, dtype, (BATCH, ROWS, cfg.vocab_size), "draft logits for the token after input_ids"),
        TensorSpec(io.HIDDEN_OUT, dtype, (BATCH, ROWS, cfg.hidden_size), "after shared_head.norm: input of depth k+1"),
        *_kv_specs(io.new(), cfg, dtype, NEW, "new"),
    ]
    assert [o.name for o in outputs] == io.MTP_OUTPUTS
    return inputs, outputs


class TrunkGraph(nn.Module):
    def __init__(self, model: DeepseekV3):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, past: tuple[torch.Tensor, ...]):
        n = len(past) // 2
        kv = [LayerKV(past[2 * i], past[2 * i + 1]) for i in range(n)]
        out = self.model(input_ids, position_ids, kv, attention_mask)
        return (out.logits, out.hidden, *[t for layer in out.new_kv for t in layer])


class MtpGraph(nn.Module):
    def __init__(self, model: DeepseekV3, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, input_ids, hidden, position_ids, attention_mask, past_c_kv, past_k_pe, output_rows):
        out = self.model.mtp_forward(self.k, input_ids, hidden, position_ids, LayerKV(past_c_kv, past_k_pe),
                                     attention_mask, output_rows)  # fmt: skip
        return out.logits, out.hidden, out.new_kv.c_kv, out.new_kv.k_pe


def example_inputs(cfg: ModelConfig, dtype: torch.dtype, which: str, b: int, s: int, p: int, seed: int = 0):
    """Random inputs of one graph at (batch, new tokens, past); sizes >= 2 keep export from specializing."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    pos = (torch.arange(s) + p)[None].expand(b, s).contiguous()
    mask = torch.ones(b, p + s, dtype=torch.int64)

    def kv():
        return (torch.randn(b, p, cfg.kv_lora_rank, generator=g).to(dtype),
                torch.randn(b, p, cfg.qk_rope_head_dim, generator=g).to(dtype))  # fmt: skip

    if which == "trunk":
        past = tuple(t for _ in range(cfg.num_hidden_layers) for t in kv())
        return (ids, pos, mask, past)
    hidden = torch.randn(b, s, cfg.hidden_size, generator=g).to(dtype)
    rows = torch.arange(1, s)[None].expand(b, s - 1).contiguous()  # N = S - 1 rows: export keeps N and S apart
    return (ids, hidden, pos, mask, *kv(), rows)


def dynamic_shapes(which: str, n_layers: int):
    auto = torch.export.Dim.AUTO  # export infers total_len = past_len + new_tokens itself
    two = {0: auto, 1: auto}
    if which == "trunk":
        return (two, two, two, tuple(two for _ in range(2 * n_layers)))
    return (two, {0: auto, 1: auto}, two, two, two, two, two)
