"""Routed experts through nextn's own CPU kernel (`kernels/routed_experts.c`), in place of ONNX Runtime's fp32 `MoE`.

ONNX Runtime's CPU `MoE` multiplies each picked expert by a general GEMM on its transposed weights, which
repacks them at every call: at decode widths (1-8 tokens) that costs more than reading them. The kernel reads
each picked expert's weights once for all the tokens that picked it, front to back, shares the (expert, half)
tasks between the session's threads, and a token's output depends neither on the other tokens in the call nor
on the threads. Measured (`benchmarks/routed_experts.py`, BENCHMARKS.md): the embedded model's experts alone
0.37-0.48x the op's time at 1-8 tokens; trunk passes 0.67-0.93x (embedded), 0.85-0.93x (issue 14's 1 GB
checkpoint, fp32), 0.70-0.84x (the same in bf16).

A session that pre-packs (engines._load_forms) rewrites each fp32 MoE node of the form nextn exports

    com.microsoft.MoE(x, router_probs, fc1 [E, 2I, H] gate/up rows interleaved, "", fc2 [E, H, I])
 -> nextn.RoutedExperts(x, router_probs, fc1 [E, 2, H, I] per half of the units: gate columns, then up
                                                          columns, fc2 [E, I, H])

with the same k and normalize_routing_weights: the same function, the stacks laid out anew (private copies made
when the session opens, like the expert halves'; an odd I stays in one part). Where every weight of a node is a
bfloat16 value (a bf16 checkpoint, as DeepSeek-V3's and the embedded model's are, exported in fp32), the node is
RoutedExpertsBf16 and its stacks hold the bf16 bit patterns: half the bytes to read, the same fp32 values once
widened, the same fp32 arithmetic. The kernel is C (kernels/routed_experts.c),
built with nextn's other kernels (native.py); without it the graph keeps ONNX Runtime's MoE.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from nextn.calib.rewrite import MS_DOMAIN, initializers_read_once, node_attributes
from nextn.runtime.native import DOMAIN, retype, use_kernel_nodes
from nextn.runtime.packed_blocks import BlockMatrix, from_nbits, pack_matrix

OP_TYPE = "RoutedExperts"  # fp32 stacks
OP_TYPE_BF16 = "RoutedExpertsBf16"  # stacks of bf16 values, stored as their uint16 bit patterns
OP_TYPE_Q = "QRoutedExperts"  # 4- or 8-bit blockwise experts (a QMoE's), packed for VNNI (kernels/qmm.h)
OP_TYPES = (OP_TYPE, OP_TYPE_BF16, OP_TYPE_Q)


def use_routed_experts(model: onnx.ModelProto, array: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Rewrite, in place, every fp32 MoE node of nextn's exported form whose stacks no other node reads.
    `array(name)` reads an initializer. -> the kernel's stacks by initializer name, to hand to the session in
    place of the file's (same names, new dims; bf16 ones in half the bytes)."""
    inits = initializers_read_once(model)
    stacks: dict[str, np.ndarray] = {}
    nodes = []
    for node in model.graph.node:
        attrs = _plain_moe_attributes(node)
        weights = (node.input[2], node.input[4]) if attrs is not None else ()
        own = all(w in inits and inits[w].data_type == onnx.TensorProto.FLOAT for w in weights)
        if attrs is None or not own:
            nodes.append(node)
            continue
        fc1, fc2 = array(weights[0]), array(weights[1])  # [E, 2I, H] interleaved, [E, H, I]
        bf16 = is_bf16(fc1) and is_bf16(fc2)  # a bf16 checkpoint's weights: read in half the bytes, same values
        block = expert_block_cols(fc1.shape[2], fc1.shape[1] // 2, 2 if bf16 else 4)
        pair = transposed_stacks(fc1, fc2, block)
        for name, w in zip(weights, pair):
            stacks[name] = bf16_bits(w) if bf16 else w
            retype(inits[name], stacks[name])
        nodes.append(helper.make_node(OP_TYPE_BF16 if bf16 else OP_TYPE, [node.input[0], node.input[1], *weights],
                                      list(node.output), name=node.name, domain=DOMAIN, block_cols=block,
                                      **attrs))  # fmt: skip
    if stacks:
        use_kernel_nodes(model, nodes)
    return stacks


def use_quantized_experts(model: onnx.ModelProto, array: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Rewrite, in place, every QMoE node of the form nextn's calibration writes (4- or 8-bit experts, accuracy
    level 4, SwiGLU interleaved, no biases) whose weights no other node reads:

        com.microsoft.QMoE(x, router_probs, fc1_q, fc1_scales, "", fc2_q, fc2_scales, "", ..., fc1_zp, fc2_zp)
     -> nextn.QRoutedExperts(x, router_probs, weights [E, P, bytes], params [E, P, floats])

    each expert in P parts of its units (quantized_stacks), the same weights and the same per-block int8 rounding
    of the activations as the op's, so the two agree to fp32 rounding. -> the new stacks by name (fc1_q's and
    fc1_scales' names; fc2's and the zero points' initializers leave the graph)."""
    inits = initializers_read_once(model)
    stacks: dict[str, np.ndarray] = {}
    nodes, dropped = [], set()
    for node in model.graph.node:
        attrs = _plain_qmoe_attributes(node)
        ins = list(node.input) + [""] * (13 - len(node.input))
        weights = [ins[i] for i in (2, 3, 5, 6, 11, 12) if ins[i]]
        if attrs is None or not all(w in inits for w in weights):
            nodes.append(node)
            continue
        packed = quantized_stacks(*(array(ins[i]) if ins[i] else None for i in (2, 3, 11, 5, 6, 12)),
                                  attrs["block_size"], attrs["bits"])  # fmt: skip
        if packed is None:
            nodes.append(node)
            continue
        (data, params), inter = packed
        for name, w in ((ins[2], data), (ins[3], params)):
            stacks[name] = w
            retype(inits[name], w)
        dropped.update(w for w in weights if w not in (ins[2], ins[3]))
        nodes.append(helper.make_node(OP_TYPE_Q, [ins[0], ins[1], ins[2], ins[3]], list(node.output), name=node.name,
                                      domain=DOMAIN, k=attrs["k"], normalize_routing_weights=attrs["normalize"],
                                      bits=attrs["bits"], block_size=attrs["block_size"], inter=inter))  # fmt: skip
    if stacks:
        use_kernel_nodes(model, nodes, dropped)
    return stacks


def quantized_stacks(fc1_q, fc1_scales, fc1_zero, fc2_q, fc2_scales, fc2_zero, block: int, bits: int):
    """A QMoE's experts (fc1 [E, 2I, H bits / 8] gate/up rows interleaved, fc2 [E, H, I bits / 8], scales and
    zero points in MatMulNBits' layout) -> ((weights uint8 [E, P, bytes], params fp32 [E, P, floats]), I): per
    expert and part p of P = 2 (1 where I / 2 is not a whole number of blocks) of its units, the packed fc1 of the
    part's gate columns then its up ones ([H, 2J]), then the packed fc2 of its rows ([J, H]). None where the
    kernel's products cannot take the shapes (qmm.h: K a multiple of 8)."""
    per_byte, (n_experts, two_i), hidden = 8 // bits, fc1_q.shape[:2], fc2_q.shape[1]
    inter = two_i // 2
    parts = 2 if inter % 2 == 0 and (inter // 2) % block == 0 else 1
    width = inter // parts
    stored = fc1_q.shape[2] * per_byte, fc2_q.shape[2] * per_byte  # K of each, padded to whole blocks
    if (hidden % 8 or width % 8 or block % 8 or fc2_q.shape[0] != n_experts
            or stored != (-(-hidden // block) * block, -(-inter // block) * block)):  # fmt: skip
        return None
    data, params = [], []
    for e in range(n_experts):
        fc1 = from_nbits(fc1_q[e], fc1_scales[e], None if fc1_zero is None else fc1_zero[e], hidden, two_i, block, bits)
        fc2 = from_nbits(fc2_q[e], fc2_scales[e], None if fc2_zero is None else fc2_zero[e], inter, hidden, block,
                         bits)  # fmt: skip
        for p in range(parts):
            units = np.arange(p * width, (p + 1) * width)
            rows = slice(p * width, (p + 1) * width)
            blocks = slice(p * width // block, -(-(p + 1) * width // block))
            down = BlockMatrix(fc2.q[:, rows], fc2.scale[:, blocks], fc2.zero[:, blocks], block, bits)
            pieces = [pack_matrix(fc1.columns(np.concatenate([2 * units, 2 * units + 1]))), pack_matrix(down)]
            data.append(np.concatenate([q for q, _ in pieces]))
            params.append(np.concatenate([f for _, f in pieces]))
    shape = (n_experts, parts)
    return (np.stack(data).reshape(*shape, -1), np.stack(params).reshape(*shape, -1)), inter


def _plain_qmoe_attributes(node: onnx.NodeProto) -> dict | None:
    """k, normalize, bits and block_size of a QMoE node the kernel computes as the op does (SwiGLU interleaved,
    alpha 1, beta 0, no clamp, no biases, no fc3, 4 or 8 bits in blocks, activations rounded to int8 per block:
    accuracy level 4), else None."""
    if node.domain != MS_DOMAIN or node.op_type != "QMoE" or len(node.input) < 7:
        return None
    ins = list(node.input) + [""] * (13 - len(node.input))
    if any(ins[i] for i in (4, 7, 8, 9, 10)) or not ins[3] or not ins[6]:  # biases, fc3; the scales
        return None
    a = node_attributes(node)
    if (not plain_swiglu(a) or a.get("expert_weight_bits") not in (4, 8) or a.get("block_size", 0) < 8
            or a.get("accuracy_level") != 4):  # fmt: skip
        return None
    return {"k": int(a["k"]), "normalize": int(a.get("normalize_routing_weights", 0)),
            "bits": int(a["expert_weight_bits"]), "block_size": int(a["block_size"])}  # fmt: skip


def is_bf16(w: np.ndarray) -> bool:
    """Every fp32 value is a bfloat16 one (its low 16 bits zero): a bf16 checkpoint's weights, as exported."""
    return bool(not (np.ascontiguousarray(w).view(np.uint32) & 0xFFFF).any())


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """The bf16 bit patterns of fp32 values that are bf16 ones (exact): fp32's upper 16 bits, as uint16."""
    return (np.ascontiguousarray(w).view(np.uint32) >> 16).astype(np.uint16)


# An expert part's matrices in column blocks of BLOCK_COLS where a part's gate/up matrix holds at least
# BLOCKED_BYTES (the node's block_cols attribute; 0: whole rows). Blocks make a chunk pass of 2-4 tokens read
# memory front to back: the 1 GB checkpoint's fp32 experts (1 MB a part) streamed at 12-15 GB/s in strided row
# pieces against 20-24 in blocks; parts that stay in cache (the embedded model's, 48 KB) ran 2-5% slower in
# blocks (twice the passes over their rows), so they keep whole rows.
BLOCK_COLS, BLOCKED_BYTES = 128, 256 * 1024


def expert_block_cols(hidden: int, inter: int, elem: int) -> int:
    """block_cols for experts of `hidden` x `inter` units at `elem` bytes a weight (transposed_stacks)."""
    parts = 2 if inter % 2 == 0 else 1
    return BLOCK_COLS if hidden * 2 * (inter // parts) * elem >= BLOCKED_BYTES else 0


def transposed_stacks(fc1: np.ndarray, fc2: np.ndarray, block: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MoE's stacks -> the kernel's: fc1 [E, 2I, H] (gate_0, up_0, gate_1, ... rows) -> [E, P, H, 2J], each
    expert's units in P = 2 parts of J = I / 2 (1 part of I when I is odd) that the threads share, each part
    its gate's J columns then its up's; fc2 [E, H, I] -> [E, I, H]. With `block`, each part's matrix ([H, 2J];
    fc2's [J, H] rows) is stored in column blocks of that width (column_blocks): the shapes say what the kernel
    reads, the order within a part is the blocks'. Copies; the values are unchanged."""
    e, i2, h = fc1.shape
    inter = i2 // 2
    parts = 2 if inter % 2 == 0 else 1
    width = inter // parts
    kernel_fc1 = np.empty((e, parts, h, 2 * width), fc1.dtype)
    for p in range(parts):
        units = slice(p * width, (p + 1) * width)
        kernel_fc1[:, p, :, :width] = fc1[:, 0::2, :][:, units].transpose(0, 2, 1)  # gate rows of those units
        kernel_fc1[:, p, :, width:] = fc1[:, 1::2, :][:, units].transpose(0, 2, 1)  # up rows
    kernel_fc2 = np.ascontiguousarray(fc2.transpose(0, 2, 1))
    if not block:
        return kernel_fc1, kernel_fc2
    parts_fc2 = kernel_fc2.reshape(-1, width, h)  # [E, I, H] as each part's [J, H]
    return (np.stack([column_blocks(m, block) for m in kernel_fc1.reshape(-1, h, 2 * width)]).reshape(kernel_fc1.shape),
            np.stack([column_blocks(m, block) for m in parts_fc2]).reshape(e, inter, h))  # fmt: skip


def column_blocks(w: np.ndarray, block: int) -> np.ndarray:
    """W [K, N] -> [K N]: its columns in blocks of `block` (the last one narrower), each block a row-major
    [K, width] array, the blocks one after another."""
    return np.concatenate([w[:, c : c + block].ravel() for c in range(0, w.shape[1], block)])


def _plain_moe_attributes(node: onnx.NodeProto) -> dict | None:
    """k and normalize_routing_weights of a MoE node the kernel computes exactly (SwiGLU interleaved, alpha 1,
    beta 0, no clamp, no biases, no fc3), else None."""
    if node.domain != MS_DOMAIN or node.op_type != "MoE" or len(node.input) < 5:
        return None
    ins = list(node.input)
    if ins[3] or any(ins[5:]):  # fc1 bias, fc2 bias, fc3 and its bias
        return None
    a = node_attributes(node)
    if not plain_swiglu(a):
        return None
    return {"k": int(a["k"]), "normalize_routing_weights": int(a.get("normalize_routing_weights", 0))}


def plain_swiglu(attrs: dict) -> bool:
    """A MoE / QMoE node's attributes (name -> value) say what nextn's kernels compute: SwiGLU with gate and up
    rows interleaved, silu(gate) * up exactly (activation_alpha 1 and activation_beta 0, both stated, as nextn's
    export writes them), no clamp, and k >= 1."""
    act = attrs.get("activation_type", b"")
    act = act.decode() if isinstance(act, bytes) else act
    return (act == "swiglu" and attrs.get("swiglu_fusion") == 1 and attrs.get("activation_alpha") == 1.0
            and attrs.get("activation_beta") == 0.0 and "swiglu_limit" not in attrs and attrs.get("k", 0) >= 1)  # fmt: skip
