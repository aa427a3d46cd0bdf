"""The graphs' I/O contract, written once: feed names, output order and the cache layout per layer.

Export (graphs.py declares the specs from these names, validate.py feeds them), the runtime
(runtime/decoder.py), calibration (calib/observe.py, calib/report.py) and the benchmarks build their
feeds and read their outputs through these functions, never by spelling names or output positions.
No torch here: the runtime imports it.

trunk.onnx   in:  input_ids [B, S], position_ids [B, S], attention_mask [B, P + S],
                  past.{i}.c_kv [B, P, kv_lora_rank], past.{i}.k_pe [B, P, qk_rope_head_dim]  per layer i
             out: logits [B, S, V], hidden [B, S, H], then new.{i}.c_kv [B, S, R], new.{i}.k_pe [B, S, D] per layer
mtp_{k}.onnx in:  input_ids, hidden, position_ids, attention_mask, past.c_kv, past.k_pe, output_rows [B, N]
             out: logits [B, N, V], hidden_out [B, N, H] (at output_rows), new.c_kv, new.k_pe (all S rows)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

INPUT_IDS, POSITION_IDS, ATTENTION_MASK = "input_ids", "position_ids", "attention_mask"
HIDDEN = "hidden"  # the trunk's output, an MTP module's input
LOGITS, HIDDEN_OUT = "logits", "hidden_out"
OUTPUT_ROWS = "output_rows"  # an MTP graph's rows (indices into new_tokens) whose logits and hidden_out are wanted


def past(layer: int | None = None) -> tuple[str, str]:
    """(c_kv, k_pe) input names of trunk layer `layer`'s past cache, or of an MTP module's (None)."""
    p = "past." if layer is None else f"past.{layer}."
    return f"{p}c_kv", f"{p}k_pe"


def new(layer: int | None = None) -> tuple[str, str]:
    """(c_kv, k_pe) output names of the new cache entries of trunk layer `layer`, or of an MTP module's."""
    p = "new." if layer is None else f"new.{layer}."
    return f"{p}c_kv", f"{p}k_pe"


def trunk_outputs(layers: int) -> list[str]:
    """The trunk's output names, in order."""
    return [LOGITS, HIDDEN, *[name for i in range(layers) for name in new(i)]]


MTP_OUTPUTS = [LOGITS, HIDDEN_OUT, *new()]
LOGITS_AT, HIDDEN_AT = 0, 1  # positions of logits and hidden (hidden_out) among either graph's outputs


def trunk_feed(input_ids, position_ids, attention_mask, pasts: Sequence[tuple[Any, Any]]) -> dict[str, Any]:
    """A trunk feed: `pasts` holds (c_kv, k_pe) per layer."""
    feed = {INPUT_IDS: input_ids, POSITION_IDS: position_ids, ATTENTION_MASK: attention_mask}
    for i, (c_kv, k_pe) in enumerate(pasts):
        c, k = past(i)
        feed[c], feed[k] = c_kv, k_pe
    return feed


def mtp_feed(input_ids, hidden, position_ids, attention_mask, past_c_kv, past_k_pe, output_rows=None) -> dict[str, Any]:
    """An MTP feed; output_rows [B, N] int64 (None: every row, [[0, 1, .., S-1]] * B as numpy)."""
    if output_rows is None:
        b, s = input_ids.shape
        output_rows = np.tile(np.arange(s, dtype=np.int64), (b, 1))
    c, k = past()
    return {INPUT_IDS: input_ids, HIDDEN: hidden, POSITION_IDS: position_ids, ATTENTION_MASK: attention_mask,
            c: past_c_kv, k: past_k_pe, OUTPUT_ROWS: output_rows}  # fmt: skip


class TrunkOut(NamedTuple):
    logits: Any  # [B, S, V]
    hidden: Any  # [B, S, H]
    new: list[tuple[Any, Any]]  # (c_kv [B, S, R], k_pe [B, S, D]) per layer


def split_trunk(out: Sequence[Any]) -> TrunkOut:
    """The trunk's outputs, in trunk_outputs() order, by meaning."""
    return TrunkOut(out[0], out[1], [(out[2 + 2 * i], out[3 + 2 * i]) for i in range((len(out) - 2) // 2)])


def trunk_into(layers_new: Sequence[tuple[Any, Any]], hidden=None) -> dict[str, Any]:
    """Caller buffers for the trunk's new entries (and its hidden), by output name."""
    into = {}
    for i, (c_kv, k_pe) in enumerate(layers_new):
        c, k = new(i)
        into[c], into[k] = c_kv, k_pe
    if hidden is not None:
        into[HIDDEN] = hidden
    return into
