"""Products with bf16 weights read as bf16, on nextn's kernel (`kernels/bf16_matmul.c`), in place of fp32 `MatMul`.

A bf16 checkpoint (DeepSeek-V3's, the embedded model's) exported in fp32 has weights whose values are all
bfloat16 ones: their low 16 bits are zero. ONNX Runtime's MatMul reads those 4 bytes a weight; the kernel reads
the 2 that matter and widens them to the same fp32 values, so the products are the same fp32 arithmetic over
half the bytes (only the order of the sums differs from MLAS's: each output is summed over K in order, the same
for a row whatever the other rows of the call).

A session that pre-packs (engines._load_forms) rewrites, after sibling products are merged,

    MatMul(x [..., K], W [K, N] fp32 initializer, every value a bf16 one, no other node reading it)
 -> nextn.Bf16MatMul(x, W's bf16 bit patterns [K N] uint16, in column blocks of BLOCK, n = N, block = BLOCK)

Products that only feed a router stay as exported (their scores pick experts: calib/rewrite.py). The blocks
are copies made when the session opens (half the bytes of the fp32 weights they replace, which the session then
no longer reads).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from nextn.calib.rewrite import initializers_read_once, is_router_product, node_readers
from nextn.runtime.native import DOMAIN, retype, use_kernel_nodes
from nextn.runtime.routed_experts import bf16_bits, column_blocks, is_bf16

OP_TYPE = "Bf16MatMul"
# Columns a task reads front to back (the node's `block`): the widest chunk that every group of 1-4 rows runs in one
# pass (routed_experts.c's tokens_times), so a group reads a block's rows once. With blocks of 128, groups of 4 rows
# (a verify pass, a prefill) ran a 96- then two 16-column passes over each block's rows: the embedded trunk's 4-token
# pass took 1.04-1.05x the time it takes over blocks of 96, a 64-token prefill 1.07-1.31x (BENCHMARKS.md,
# benchmarks/bf16_blocks.py).
BLOCK = 96


def use_bf16_matmul(model: onnx.ModelProto, array: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Rewrite, in place, every MatMul of `model` whose weight is a 2-D fp32 initializer of bf16 values that no
    other node reads, unless it only feeds a router. `array(name)` reads an initializer. -> the kernel's blocks by
    initializer name (uint16 [K N]), to hand to the session in place of the file's."""
    inits = initializers_read_once(model)
    readers = node_readers(model)
    blocks: dict[str, np.ndarray] = {}
    nodes = []
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.domain == "" and node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT or is_router_product(node, readers):
            nodes.append(node)
            continue
        values = array(w.name)
        if not is_bf16(values):
            nodes.append(node)
            continue
        blocks[w.name] = column_blocks(bf16_bits(values), BLOCK)
        retype(w, blocks[w.name])
        nodes.append(helper.make_node(OP_TYPE, list(node.input), list(node.output), name=node.name, domain=DOMAIN,
                                      n=int(values.shape[1]), block=BLOCK))  # fmt: skip
    if blocks:
        use_kernel_nodes(model, nodes)
    return blocks
