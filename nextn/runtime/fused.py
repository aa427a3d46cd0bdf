"""The verify-and-draft graph: the trunk and MTP module 0 composed into one ONNX graph, at load time.

A greedy drafting step otherwise makes two calls into the runtime: the trunk verifies [t_n, d_1 .. d_K],
then (next step) module 0 runs over the accepted slots to catch its cache up and draft d_1'. Module 0 at
slot n+j takes (trunk hidden h_{n+j}, token t_{n+j+1}); under greedy acceptance t_{n+j+1} is the trunk's
own argmax g_j at slot n+j for every j up to the first rejection (an accepted draft equals it; the token
emitted at the rejection is it). So module 0 can run on (h_{n+j}, g_j) for all K+1 slots in the same call:
rows up to the accepted length a are exactly what the separate call would compute, row a's argmax is the
next first draft, rows past a are discarded like the trunk's rejected slots. Sampling and relaxed
acceptance emit other tokens than g_j, so they keep the two calls.

    trunk inputs ──── trunk graph ──┬─ logits [B, S, V] ─ ArgMax ─ g [B, S] ──────────┐
                                    ├─ hidden [B, S, H] ──────────────────────────────┤ module 0 (names
    position_ids + 1, attention_mask, mtp0/past.* ────────────────────────────────────┤ prefixed mtp0/)
                                    └─ new.{i}.*                                       └─ ArgMax(logits) ─ draft_tokens [B, S]

Built from the artifact's own graphs (any scheme: fp32, or int4 drafts under an fp32 trunk), so nothing
is exported twice and the weights are the same OrtValues over the shared mapping.
"""

from __future__ import annotations

from pathlib import Path

from nextn.export import io


def compose(trunk: Path, mtp: Path):
    """The verify-and-draft ModelProto of an artifact's trunk and module-0 graphs (external data left as
    references: the engine hands every such initializer over from the shared mapping)."""
    import onnx
    from onnx import TensorProto, helper

    t = onnx.load(str(trunk), load_external_data=False)
    m = onnx.load(str(mtp), load_external_data=False)
    m = onnx.compose.add_prefix(m, io.FUSED_PREFIX, rename_functions=True)
    p = io.FUSED_PREFIX
    greedy, pos = p + "greedy_ids", p + "positions"
    wired = {p + io.INPUT_IDS: greedy, p + io.HIDDEN: io.HIDDEN, p + io.POSITION_IDS: pos,
             p + io.ATTENTION_MASK: io.ATTENTION_MASK}  # fmt: skip
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = wired.get(name, name)
    g = t.graph
    g.initializer.append(helper.make_tensor(p + "one", TensorProto.INT64, [], [1]))
    g.node.extend([
        helper.make_node("ArgMax", [io.LOGITS], [greedy], axis=-1, keepdims=0),  # [B, S]: g_j
        helper.make_node("Add", [io.POSITION_IDS, p + "one"], [pos]),  # module 0 at slot i sits at position i + 1
        *m.graph.node,
        helper.make_node("ArgMax", [p + io.LOGITS], [io.DRAFT_TOKENS], axis=-1, keepdims=0),
    ])  # fmt: skip
    g.initializer.extend(m.graph.initializer)
    g.value_info.extend(m.graph.value_info)
    g.input.extend(i for i in m.graph.input if i.name not in wired)
    outs = {o.name: o for o in m.graph.output}
    g.output.append(helper.make_tensor_value_info(io.DRAFT_TOKENS, TensorProto.INT64, ["batch", "new_tokens"]))
    g.output.extend(outs[name] for name in io.fused_outputs(0) if name in outs)
    have = {o.domain for o in t.opset_import}
    t.opset_import.extend(o for o in m.opset_import if o.domain not in have)
    return t
