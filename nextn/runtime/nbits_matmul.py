"""A quantized trunk's MatMulNBits on nextn's kernel (`kernels/nbits_matmul.c`), over the VNNI products of
`kernels/qmm.h` that nextn.MtpModule and nextn.QRoutedExperts run on.

In a decode step of issue 14's int4 trunk, ONNX Runtime's MatMulNBits read the 4-bit linears at ~13 GB/s and
the 8-bit head at ~21 GB/s (BENCHMARKS.md). The kernel computes what MatMulNBits at accuracy level 4 computes
(each activation row rounded to int8 per block, the same weights, int32 sums per block): the two agree to fp32
rounding, and a row's output does not depend on the other rows of the call.

A session that pre-packs (engines._load_forms) rewrites, after sibling products are merged,

    com.microsoft.MatMulNBits(x, B [N, blocks, blob], scales, zero_points)   bits 4 or 8, accuracy_level 4
 -> nextn.NBitsMatMul(x, tiles uint8 [bytes], params fp32 [floats])         k, n, block, bits

where no other node reads B, the scales or the zero points, there is no bias or g_idx, and K and the block size
are multiples of 8 (qmm.h's groups). The tiles (pack_matrix) are copies made when the session opens, in the place
of B; the zero points leave the graph.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from nextn.calib.rewrite import MS_DOMAIN, initializers_read_once, node_attributes
from nextn.runtime.native import DOMAIN, retype, use_kernel_nodes
from nextn.runtime.packed_blocks import from_nbits, pack_matrix

OP_TYPE = "NBitsMatMul"


def use_nbits_matmul(model: onnx.ModelProto, array: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Rewrite, in place, every MatMulNBits of `model` the kernel computes as the op does (above). `array(name)`
    reads an initializer. -> the kernel's tiles and params by initializer name (B's and the scales'), to hand to
    the session in place of the file's."""
    inits = initializers_read_once(model)
    stacks: dict[str, np.ndarray] = {}
    nodes, dropped = [], set()
    for node in model.graph.node:
        attrs = _plain_attributes(node, inits)
        if attrs is None:
            nodes.append(node)
            continue
        k, n, block, bits = attrs
        b, scales, zero = node.input[1], node.input[2], node.input[3] if len(node.input) > 3 else ""
        matrix = from_nbits(array(b), array(scales), array(zero) if zero else None, k, n, block, bits)
        tiles, params = pack_matrix(matrix)
        for name, value in ((b, tiles), (scales, params)):
            stacks[name] = value
            retype(inits[name], value)
        if zero:
            dropped.add(zero)
        nodes.append(helper.make_node(OP_TYPE, [node.input[0], b, scales], list(node.output), name=node.name,
                                      domain=DOMAIN, k=k, n=n, block=block, bits=bits))  # fmt: skip
    if stacks:
        use_kernel_nodes(model, nodes, dropped)
    return stacks


def _plain_attributes(node: onnx.NodeProto, inits: dict) -> tuple[int, int, int, int] | None:
    """(K, N, block size, bits) of a MatMulNBits node the kernel computes as the op does, else None."""
    if node.domain != MS_DOMAIN or node.op_type != "MatMulNBits" or not 3 <= len(node.input) <= 4:
        return None
    if not all(name in inits for name in node.input[1:] if name) or not node.input[2]:
        return None
    zero = inits.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if inits[node.input[1]].data_type != onnx.TensorProto.UINT8:
        return None
    if zero is not None and zero.data_type != onnx.TensorProto.UINT8:
        return None  # float zero points: not qmm's integer form
    a = node_attributes(node)
    k, n, block = (int(a.get(x, 0)) for x in ("K", "N", "block_size"))
    bits = int(a.get("bits", 4))
    if bits not in (4, 8) or a.get("accuracy_level") != 4 or k % 8 or block < 8 or block % 8 or n < 1:
        return None
    return k, n, block, bits
