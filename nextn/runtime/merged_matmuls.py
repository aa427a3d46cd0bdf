"""Sibling matrix products merged into one when a session opens: fewer, wider parallel sections.

Several linears of a DeepSeek-V3 layer read the same activation: q_a_proj and kv_a_proj_with_mqa (the
normed hidden), the shared expert's (and a dense layer's) gate_proj and up_proj (the post-attention norm).
ONNX Runtime runs each as its own op, and on 2 threads each small op hands half its work to the other thread
and waits: on the 1 GB int4 trunk the [1024 -> 256] products scaled 1.22x from one thread to two where the head
scaled 2.02x. Merged, they are one product over the concatenated output columns and a Split back to the old
output names:

    A ─ MatMulNBits(B1 [N1, blocks, blob]) ─ y1          A ─ MatMulNBits(B1;B2 [N1+N2, ...]) ─ Split(N1, N2) ─ y1
    A ─ MatMulNBits(B2 [N2, blocks, blob]) ─ y2    ->                                                       └ y2
    (fp32: MatMul(A, W1 [K, N1]), MatMul(A, W2 [K, N2])  ->  MatMul(A, W1|W2 [K, N1+N2]) ─ Split)

Each output column is the same dot product over the same K as before (MatMulNBits: the same blocks, scales and
zero points, the activation quantized per block of K alike), so the values do not change. Products that only feed
a router (Sigmoid, Softmax, MoEGroupRouter) are left alone: their scores pick experts, where a last-bit
difference in a near-tie would pick another. The merged weights are copies made when the session opens.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nextn.calib.rewrite import MS_DOMAIN, is_router_product, node_attributes, node_readers

MERGED_SUFFIX = ".merged"


def merge_sibling_matmuls(model: onnx.ModelProto, array: Callable[[str], np.ndarray]) -> int:
    """Merge every group of sibling MatMulNBits (same input and attributes) and of fp32 MatMuls with a 2-D
    weight (same input) in `model`, in place; the merged weights go into the graph itself (they are the
    siblings' bytes, a small share of a model's). `array(name)` reads an initializer. -> groups merged."""
    inits = {t.name: t for t in model.graph.initializer}
    readers = node_readers(model)
    groups: dict[tuple, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        key = _merge_key(node, inits, readers)
        if key is not None:
            groups.setdefault(key, []).append(node)
    merged: dict[str, np.ndarray] = {}
    replace: dict[int, list[onnx.NodeProto]] = {}  # id of a group's first node -> the nodes standing for the group
    drop: set[int] = set()
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        new_nodes, arrays = _merge(nodes, inits, array)
        merged.update(arrays)
        replace[id(nodes[0])] = new_nodes
        drop.update(id(n) for n in nodes[1:])
    if not merged:
        return 0
    out = []
    for node in model.graph.node:
        if id(node) in replace:
            out += replace[id(node)]
        elif id(node) not in drop:
            out.append(node)
    del model.graph.node[:]
    model.graph.node.extend(out)
    model.graph.initializer.extend(numpy_helper.from_array(arr, name) for name, arr in merged.items())
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    del model.graph.value_info[:]
    return len(replace)


def _merge_key(node: onnx.NodeProto, inits: dict, readers: dict) -> tuple | None:
    """What siblings must share to merge (None: this node never merges)."""
    if is_router_product(node, readers):
        return None
    if node.domain == MS_DOMAIN and node.op_type == "MatMulNBits":
        if len(node.input) != 4 or not all(i in inits for i in node.input[1:]):
            return None  # no bias, g_idx or missing zero points: the layouts nextn's calib writes
        attrs = node_attributes(node)
        return ("nbits", node.input[0], attrs.get("K"), attrs.get("bits", 4), attrs.get("block_size"),
                attrs.get("accuracy_level", 0), inits[node.input[1]].data_type)  # fmt: skip
    if node.domain == "" and node.op_type == "MatMul" and node.input[1] in inits:
        w = inits[node.input[1]]
        if len(w.dims) == 2 and w.data_type == onnx.TensorProto.FLOAT:
            return ("matmul", node.input[0], w.dims[0])
    return None


def _merge(nodes: list[onnx.NodeProto], inits: dict, array) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """One product over the group's concatenated columns and a Split back to each node's output."""
    first = nodes[0]
    base = first.name + MERGED_SUFFIX
    wide = first.output[0] + MERGED_SUFFIX
    if first.op_type == "MatMul":
        ws = [array(n.input[1]) for n in nodes]  # [K, N_i]
        widths = [w.shape[1] for w in ws]
        arrays = {f"{base}.weight": np.concatenate(ws, axis=1)}  # [K, sum N_i]
        product = helper.make_node("MatMul", [first.input[0], f"{base}.weight"], [wide], name=base)
    else:
        widths = [int(inits[n.input[1]].dims[0]) for n in nodes]
        # B [N, blocks, blob], scales [N * blocks], zero points [N * bytes per row]: all N-major, concatenated
        arrays = {f"{base}.{part}": np.concatenate([array(n.input[i]) for n in nodes], axis=0)
                  for i, part in ((1, "B"), (2, "scales"), (3, "zero_points"))}  # fmt: skip
        attrs = node_attributes(first)
        attrs["N"] = sum(widths)
        product = helper.make_node("MatMulNBits", [first.input[0], *arrays], [wide], name=base, domain=MS_DOMAIN,
                                   **attrs)  # fmt: skip
    split_sizes = f"{base}.split"
    arrays[split_sizes] = np.asarray(widths, np.int64)
    split = helper.make_node("Split", [wide, split_sizes], [o for n in nodes for o in n.output], axis=-1,
                             name=base + ".split")  # fmt: skip
    return [product, split], arrays
