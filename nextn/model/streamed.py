"""The reference model over whole sequences with one decoder layer in memory at a time.

For what must see the model's activations without holding it (the quality report of `nextn export
--quantize`, sequential GPTQ in calib/sequential.py): the embedding, final norm and head stay loaded
(`TopLoaded`); each layer is loaded, run over every sequence's hidden states, and dropped before the next
(`TopLoaded.layer`). The same modules and order of operations as `DeepseekV3.forward` with an empty cache,
so the logits are the reference's (tested equal).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nextn.model.reference import Rotary, causal_mask
from nextn.model.weights import layer_groups, load_tensors, share, skeleton, unload, wanted_names


@dataclass
class TopLoaded:
    """The reference skeleton (fp32) with its embedding, final norm and head loaded; the rest on meta."""

    model: nn.Module
    ckpt: object
    private: set
    groups: dict  # checkpoint names by layer group (weights.layer_groups)

    @classmethod
    def open(cls, ckpt, n_mtp: int, absorbed: bool) -> TopLoaded:
        model, private = skeleton(ckpt, n_mtp, absorbed, dtype=torch.float32)
        model.rotary = Rotary(ckpt.config)  # computed, not loaded: built on the CPU
        groups = layer_groups(wanted_names(ckpt, n_mtp, private))
        load_tensors(model, ckpt, groups.get("top", []), torch.float32)
        share(model, private)
        return cls(model, ckpt, private, groups)

    @contextlib.contextmanager
    def layer(self, index: int, part: nn.Module, forms: Callable | None = None, stack_experts: bool = False):
        """Checkpoint layer `index` (an MTP module's is num_hidden_layers + k) loaded into `part`, inside
        `forms(model)` if given; afterwards `part` is dropped again (the trunk's embedding and head, which an
        MTP module shares, stay)."""
        load_tensors(self.model, self.ckpt, self.groups.get(index, []), torch.float32, stack_experts)
        share(self.model, self.private)
        try:
            with forms(self.model) if forms is not None else contextlib.nullcontext():
                yield
        finally:
            unload(part, keep=(self.model.model.embed_tokens, self.model.lm_head))
            share(self.model, self.private)
            self.ckpt.release()  # the layer's file maps (an fp32 checkpoint's tensors are views of them)

    def prefill_inputs(self, sequences: list[list[int]]) -> list[list[torch.Tensor]]:
        """[x [1, n, H], cos, sin, mask] per sequence: the embedded tokens and what every layer's prefill
        from an empty cache takes."""
        out = []
        for ids in sequences:
            pos = torch.arange(len(ids))[None]  # [1, n]
            x = self.model.model.embed_tokens(torch.tensor([ids]))  # [1, n, H]
            out.append([x, *self.model.rotary(pos, x.dtype), causal_mask(pos, 0, None)])
        return out


@torch.no_grad()
def trunk_logits(ckpt, sequences: list[list[int]]) -> Iterator[np.ndarray]:
    """fp32 logits [n, V] of each sequence (one prefill from an empty cache), in order."""
    top = TopLoaded.open(ckpt, 0, absorbed=False)
    model = top.model
    states = top.prefill_inputs(sequences)
    empty = model.empty_kv(1, torch.float32, "cpu")
    for i, block in enumerate(model.model.layers):
        with top.layer(i, block):
            for state in states:
                state[0], _ = block(state[0], model.rotary, state[1], state[2], state[3], empty, False)
    for x, *_ in states:
        yield model.lm_head(model.model.norm(x))[0].numpy()  # [n, V]
