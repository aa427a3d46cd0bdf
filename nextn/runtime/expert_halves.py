"""Routed experts in halves, so that ONNX Runtime's CPU MoE kernels share them evenly between threads.

ONNX Runtime's CPU `MoE` and `QMoE` give each intra-op thread a contiguous range of experts (on 2 threads:
experts [0, E/2) and [E/2, E)), and a token reads only the k it picked. Their split between the ranges is
left to routing: 4/0 or 3/1 about as often as 2/2, and group-limited routing (a group is a contiguous
range) makes it worse. Measured on issue 14's checkpoint (16 experts, top 4 in 2 of 4 groups): the fp32
MoE ran 1.31x faster on 2 threads than on 1, the matrix products around it 1.84x.

An expert's SwiGLU MLP is a sum over its intermediate units, so it is exactly the sum of two experts of
half its width. Opening a graph, each expert stack is laid out as its first halves, then its second halves,
and every thread takes one half of every picked expert:

    fc1 [E, 2I, H] (gate/up rows interleaved) ─ rows [0, I) of each expert, then rows [I, 2I)  ─ [2E, I, H]
    fc2 [E, H, I]                             ─ columns [0, I/2), then [I/2, I), times 2     ─ [2E, H, I/2]
    router_probs [N, E] ─ Concat(·, ·) ─ [N, 2E], k ─ 2k: both halves of each picked expert are picked

MoE takes a softmax of router_probs over the row, which the doubled row halves; fc2 (QMoE: its scales)
is doubled to match, exact in floating point. The weights are not changed otherwise, only where they sit:
QMoE's blockwise fc2 halves only where the half width is a whole number of blocks (and, at 4 bits, of
zero-point bytes), else that node is left as it was. The halves are copies, made when a session opens.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from nextn.calib.rewrite import MS_DOMAIN, initializers_read_once, node_attributes

HALVES_SUFFIX = ".halves"


def halve_experts(model: onnx.ModelProto, array: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Halve every MoE / QMoE node of `model` that can be, in place (the doubled router_probs, k, the
    stacks' declared shapes). `array(name)` reads an initializer. -> the new stacks by initializer name,
    to hand to the session in place of the file's (their declared bytes are the file's, same size)."""
    inits = initializers_read_once(model)
    halved: dict[str, np.ndarray] = {}
    nodes = []
    for node in model.graph.node:
        weights = [name for name in node.input[2:] if name]
        own = all(name in inits for name in weights)  # stacks no other node reads
        if node.domain == MS_DOMAIN and node.op_type in ("MoE", "QMoE") and own:
            stacks = _halved_stacks(node, array)
            if stacks is not None:
                probs = node.input[1]
                doubled = helper.make_node("Concat", [probs, probs], [probs + HALVES_SUFFIX], axis=1,
                                           name=node.name + HALVES_SUFFIX)  # fmt: skip
                nodes.append(doubled)
                node.input[1] = doubled.output[0]
                for a in node.attribute:
                    if a.name == "k":
                        a.i *= 2
                for name, arr in stacks.items():
                    del inits[name].dims[:]
                    inits[name].dims.extend(arr.shape)
                    halved[name] = arr
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]  # shapes changed: the runtime infers them again
    return halved


def _halved_stacks(node: onnx.NodeProto, array) -> dict[str, np.ndarray] | None:
    """The node's weight stacks in halves (name -> array), or None if the node cannot be halved."""
    ins = list(node.input)
    if node.op_type == "MoE":
        if len(ins) < 5 or (len(ins) > 3 and ins[3]) or (len(ins) > 5 and ins[5]):  # biases: not produced here
            return None
        w13, w2 = array(ins[2]), array(ins[4])  # [E, 2I, H], [E, H, I]
        if w2.shape[2] % 2:
            return None
        return {ins[2]: _rows_in_halves(w13), ins[4]: _columns_in_halves(w2, 2.0)}
    attrs = node_attributes(node)
    bits, block = attrs.get("expert_weight_bits"), attrs.get("block_size", 0)
    names = [ins[i] if len(ins) > i else "" for i in (2, 3, 5, 6, 11, 12)]
    if bits not in (4, 8) or not block or not all(names) or any(len(ins) > i and ins[i] for i in (4, 7, 8, 9, 10)):
        return None  # per-row scales, symmetric weights or biases: layouts not produced by nextn's calib
    fc1_q, fc1_s, fc2_q, fc2_s, fc1_z, fc2_z = (array(n) for n in names)
    inter = fc2_s.shape[2] * block  # fc2's input width I
    half_blocks = inter // 2 // block
    if inter % (2 * block) or (bits == 4 and half_blocks % 2):  # a half must be whole blocks and zero-point bytes
        return None
    return {names[0]: _rows_in_halves(fc1_q), names[1]: _rows_in_halves(fc1_s), names[4]: _rows_in_halves(fc1_z),
            names[2]: _columns_in_halves(fc2_q), names[3]: _columns_in_halves(fc2_s, 2.0),
            names[5]: _columns_in_halves(fc2_z)}  # fmt: skip


def _rows_in_halves(w: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """[E, 2R, C] -> [2E, R, C]: every expert's first R rows, then every expert's last R (times `scale`)."""
    e, r2, c = w.shape
    out = np.empty((2, e, r2 // 2, c), w.dtype)
    for half in range(2):  # one pass over the source: block copies of whole rows
        _copy(w[:, half * (r2 // 2) : (half + 1) * (r2 // 2)], out[half], scale)
    return out.reshape(2 * e, r2 // 2, c)


def _columns_in_halves(w: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """[E, R, 2C] -> [2E, R, C]: every expert's first C columns, then every expert's last C (times `scale`)."""
    e, r, c2 = w.shape
    out = np.empty((2, e, r, c2 // 2), w.dtype)
    for half in range(2):
        _copy(w[..., half * (c2 // 2) : (half + 1) * (c2 // 2)], out[half], scale)
    return out.reshape(2 * e, r, c2 // 2)


def _copy(src: np.ndarray, dst: np.ndarray, scale: float) -> None:
    if scale == 1.0:
        np.copyto(dst, src)
    else:  # float stacks and scales only; a power of two: exact
        np.multiply(src, src.dtype.type(scale), out=dst)
