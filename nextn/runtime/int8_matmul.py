"""An int8 artifact's linears on nextn's kernel (`kernels/int8_matmul.c`), in place of their Q/DQ form.

nextn's int8 calibration writes each linear as static Q/DQ (calib/rewrite.py): the activation rounded to uint8
with a calibrated scale and zero point, the weight int8 per output channel. ONNX Runtime fuses that into
QuantizeLinear + MatMulIntegerToFloat, which read issue 14's int8 linears at 12-16 GB/s at one row. The kernel
computes the same three steps (the rounding, exact int32 sums, one multiply per output), so its outputs are ONNX
Runtime's bit for bit, over weights laid out in tiles for VNNI's products.

A session that pre-packs (engines._load_forms) rewrites

    x ─ QuantizeLinear(s_x, z_x) ─ DequantizeLinear(s_x, z_x) ─ MatMul ─ y
                 W int8 [K, N] ─ DequantizeLinear(s_w [N], 0, axis 1) ─┘
 -> nextn.Int8MatMul(x, W + 128 in tiles [tiles K4 64] uint8, s_x s_w [N] fp32, (z_x - 128) sum_k W[k, n] [N]
                    int32) ─ y        n = N, x_scale = s_x, x_zero = z_x

for every such MatMul whose weight, scales and zero points no other node reads; the activation's Q/DQ pair
leaves the graph when no other node reads it. The tiles, products and sums are copies made when the session
opens, in the place of the int8 weights (the same bytes, padded to whole tiles of 16 columns and 4 rows).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from nextn.calib.rewrite import initializers_read_once, node_attributes
from nextn.runtime.native import DOMAIN, retype, use_kernel_nodes
from nextn.runtime.packed_blocks import byte_tiles

OP_TYPE = "Int8MatMul"


def use_int8_matmul(model: onnx.ModelProto, array: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Rewrite, in place, every MatMul of `model` in the static Q/DQ int8 form above whose weight, weight scales and
    weight zero points no other node reads. `array(name)` reads an initializer. -> the kernel's arrays by
    initializer name (the weight's, its scales' and its zero points' names), to hand to the session."""
    inits = initializers_read_once(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    stacks: dict[str, np.ndarray] = {}
    replaced: dict[str, onnx.NodeProto] = {}  # MatMul name -> its kernel node
    for node in model.graph.node:
        form = _int8_linear(node, producer, inits, array)
        if form is None:
            continue
        x, (w_name, s_name, z_name), (x_scale, x_zero) = form
        w = array(w_name)  # [K, N] int8
        stacks[w_name] = pack_int8(w)
        stacks[s_name] = (np.float32(x_scale) * array(s_name).astype(np.float32)).astype(np.float32)
        stacks[z_name] = ((x_zero - 128) * w.astype(np.int32).sum(axis=0)).astype(np.int32)
        for name in (w_name, s_name, z_name):
            retype(inits[name], stacks[name])
        replaced[node.name] = helper.make_node(OP_TYPE, [x, w_name, s_name, z_name], list(node.output),
                                               name=node.name, domain=DOMAIN, n=int(w.shape[1]), x_scale=float(x_scale),
                                               x_zero=int(x_zero))  # fmt: skip
    if not replaced:
        return {}
    nodes = _without_unread(model, [replaced.get(n.name, n) for n in model.graph.node])
    read = {name for n in nodes for name in n.input}
    use_kernel_nodes(model, nodes, {t.name for t in model.graph.initializer if t.name not in read})  # Q/DQ's scales
    return stacks


def pack_int8(w: np.ndarray) -> np.ndarray:
    """W [K, N] int8 -> the kernel's tiles of W + 128, uint8 [tiles K4 64]: tile t is [K4, 16, 4], byte (g, c, j)
    the value at row 4g + j of column 16t + c (zeros past K and N, so 128 there)."""
    k, n = w.shape
    q = np.full((n, -(-k // 4) * 4), 128, np.uint8)  # [N, K4 4]: W + 128, exact in a byte
    q[:, :k] = (w.T.astype(np.int16) + 128).astype(np.uint8)
    return byte_tiles(q, pad=128)


def _int8_linear(node, producer, inits, array):
    """(x, (weight, scales, zero points), (s_x, z_x)) of a MatMul in the Q/DQ form the kernel computes, else None."""
    if node.domain != "" or node.op_type != "MatMul" or len(node.input) != 2:
        return None
    act, wdq = producer.get(node.input[0]), producer.get(node.input[1])
    if not (_is_dq(act) and _is_dq(wdq) and len(act.input) == 3 and len(wdq.input) == 3):
        return None
    q = producer.get(act.input[0])
    if q is None or q.domain != "" or q.op_type != "QuantizeLinear" or list(q.input[1:]) != list(act.input[1:]):
        return None
    weights = tuple(wdq.input)
    if not all(name in inits for name in weights) or node_attributes(q) or node_attributes(act):
        return None
    w, s_w, z_w = (inits[name] for name in weights)
    shapes = (tuple(w.dims), tuple(s_w.dims), tuple(z_w.dims))
    if (len(shapes[0]) != 2 or shapes[1:] != ((shapes[0][1],),) * 2 or node_attributes(wdq) != {"axis": 1}
            or w.data_type != onnx.TensorProto.INT8 or s_w.data_type != onnx.TensorProto.FLOAT
            or z_w.data_type != onnx.TensorProto.INT8 or np.any(array(z_w.name))):  # fmt: skip
        return None
    x_scale, x_zero = _scalar(array, q.input[1]), _scalar(array, q.input[2])
    if x_scale is None or x_zero is None or x_zero.dtype != np.uint8 or not x_scale > 0:
        return None
    return q.input[0], weights, (x_scale.astype(np.float32), int(x_zero))


def _is_dq(node) -> bool:
    return node is not None and node.domain == "" and node.op_type == "DequantizeLinear"


def _scalar(array, name: str) -> np.ndarray | None:
    try:
        value = np.asarray(array(name))
    except KeyError:  # an activation, not an initializer
        return None
    return value.reshape(()) if value.size == 1 else None


def _without_unread(model: onnx.ModelProto, nodes: list) -> list:
    """`nodes` less the ones (the replaced linears' Q/DQ) whose outputs no node and no graph output reads."""
    graph_outputs = {o.name for o in model.graph.output}
    while True:
        reads = {name for n in nodes for name in n.input} | graph_outputs
        kept = [n for n in nodes if any(o in reads for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept
