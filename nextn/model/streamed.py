"""The reference trunk over whole sequences with one decoder layer in memory at a time.

For what must see the fp32 model's outputs without holding it (the quality report of `nextn export
--quantize`): the embedding, final norm and head stay loaded; each layer is loaded, run over every
sequence's hidden states, and dropped before the next. The same modules and order of operations as
`DeepseekV3.forward` with an empty cache, so the logits are the reference's (tested equal).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from nextn.model.reference import Rotary, causal_mask
from nextn.model.weights import layer_groups, load_tensors, share, skeleton, unload, wanted_names


@torch.no_grad()
def trunk_logits(ckpt, sequences: list[list[int]]) -> Iterator[np.ndarray]:
    """fp32 logits [n, V] of each sequence (one prefill from an empty cache), in order."""
    cfg = ckpt.config
    model, private = skeleton(ckpt, 0, absorbed=False, dtype=torch.float32)
    model.rotary = Rotary(cfg)
    groups = layer_groups(wanted_names(ckpt, 0, private))
    load_tensors(model, ckpt, groups.get("top", []), torch.float32)
    share(model, private)
    states = []
    for ids in sequences:
        pos = torch.arange(len(ids))[None]  # [1, n]
        x = model.model.embed_tokens(torch.tensor([ids]))  # [1, n, H]
        cos, sin = model.rotary(pos, x.dtype)
        states.append([x, cos, sin, causal_mask(pos, 0, None)])
    empty = model.empty_kv(1, torch.float32, "cpu")
    for i, block in enumerate(model.model.layers):
        load_tensors(model, ckpt, groups.get(i, []), torch.float32)
        for state in states:
            state[0], _ = block(state[0], model.rotary, state[1], state[2], state[3], empty, False)
        unload(block)
        ckpt.release()  # the layer's file maps (an fp32 checkpoint's tensors are views of them)
    for x, *_ in states:
        yield model.lm_head(model.model.norm(x))[0].numpy()  # [n, V]
