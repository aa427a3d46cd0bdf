"""MLA's absorbed per-head weights in 8 bits: the products that no 2-D quantized op can take.

In the absorbed form (DESIGN.md) `kv_b_proj` [nh * (dn + dv), R] is never a linear: the graph reshapes
and slices it into per-head matrices that batched MatMuls apply,

    q_nope [B, nh, S, dn] @ W_UK [nh, dn, R]      -> q_lat [B, nh, S, R]
    o_lat  [B, nh, S, R]  @ W_UV^T [nh, R, dv]    -> o     [B, nh, S, dv]

so the linear quantizers (Q/DQ, MatMulNBits) leave them in fp32: on the 1 GB preset 25 MB of the 115 MB an
int4 token reads (BENCHMARKS.md). ONNX Runtime's com.microsoft.MatMulIntegerToFloat takes a batched int8 B
with a scale per (head, output column); the activation is quantized per tensor with a *calibrated* scale
(as the int8 scheme's linears are), so every row's result depends on that row alone and a verify pass
computes what one-token steps compute (a dynamic per-tensor scale would not: it mixes the rows' ranges):

    x ─ QuantizeLinear(s_x, 0 int8) ─ MatMulIntegerToFloat(W_q [nh, K, N] int8, s_x, s_w [nh, 1, N]) ─ y
    s_x = amax(x) / 127 (calibration),  W_q = round(W / s_w),  s_w = max_k |W[h, k, n]| / 127

The Reshape / Slice / Transpose nodes that produced W from `kv_b_proj` become dead and are removed, and
with them the fp32 weight. Used by the int8 and int4 schemes (`--latent-bits 8`, the default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nextn.calib.rewrite import MS_DOMAIN, _substitute

LATENT_BITS = (8, 32)  # 32: keep them fp32
_CONST_OPS = ("Reshape", "Slice", "Transpose", "Squeeze", "Unsqueeze")


@dataclass(frozen=True)
class BatchedWeight:
    node: str  # the MatMul
    x: str  # its activation input [..., heads, S, K]
    w: np.ndarray  # [heads, K, N] float32, as the MatMul sees it


def latent_inputs(model: onnx.ModelProto) -> list[str]:
    """Activations of the MatMuls whose B is a constant of 3 dims or comes from initializers through shape
    ops alone (structure only: the graph's tensors need not be loaded). What calibration probes."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def constant(name: str) -> bool:
        if name in inits:
            return True
        node = producer.get(name)
        return node is not None and node.op_type in _CONST_OPS and all(constant(i) for i in node.input if i)

    out = []
    for node in model.graph.node:
        b = node.input[1] if node.op_type == "MatMul" else None
        if b and ((b in inits and len(inits[b].dims) == 3) or (b not in inits and constant(b))):
            out.append(node.input[0])
    return sorted(set(out))


def find_batched_weights(model: onnx.ModelProto) -> list[BatchedWeight]:
    """MatMuls whose B is a 3-D constant: an initializer, or computed from initializers by shape ops (export
    folds small ones, not large ones). The graph's tensors must be loaded."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    memo: dict[str, np.ndarray | None] = {}

    def const(name: str) -> np.ndarray | None:
        if name not in memo:
            memo[name] = _evaluate(name, inits, producer, const)
        return memo[name]

    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or (node.input[1] not in inits and node.input[1] not in producer):
            continue
        w = const(node.input[1])
        if w is not None and w.ndim == 3 and w.dtype == np.float32:
            found.append(BatchedWeight(node.name, node.input[0], np.ascontiguousarray(w)))
    return found


def _evaluate(name, inits, producer, const) -> np.ndarray | None:
    """The value of `name` if only initializers and shape ops lead to it, else None."""
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producer.get(name)
    if node is None or node.op_type not in _CONST_OPS or node.domain not in ("", "ai.onnx"):
        return None
    args = [const(i) if i else None for i in node.input]
    if args[0] is None or any(a is None for a, i in zip(args[1:], node.input[1:]) if i):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x = args[0]
    if node.op_type == "Transpose":
        return np.transpose(x, attrs.get("perm"))
    if node.op_type == "Reshape":
        shape = [x.shape[i] if d == 0 and not attrs.get("allowzero", 0) else int(d) for i, d in enumerate(args[1])]
        return x.reshape(shape)
    if node.op_type == "Slice":
        starts, ends = args[1], args[2]
        axes = args[3] if len(args) > 3 and args[3] is not None else range(len(starts))
        steps = args[4] if len(args) > 4 and args[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.ndim
        for a, s, e, st in zip(axes, starts, ends, steps):
            index[int(a)] = slice(int(s), int(e), int(st))
        return x[tuple(index)]
    axes = args[1] if len(args) > 1 and args[1] is not None else attrs.get("axes")
    if node.op_type == "Squeeze":
        return np.squeeze(x, axis=tuple(int(a) for a in axes)) if axes is not None else np.squeeze(x)
    return np.expand_dims(x, axis=tuple(int(a) for a in axes))  # Unsqueeze


def quantize_batched(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [H, K, N] -> int8 [H, K, N], scale [H, 1, N] float32 (symmetric, per head and output column)."""
    amax = np.abs(w).max(axis=1, keepdims=True)  # [H, 1, N]
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def apply_latent_int8(model: onnx.ModelProto, found: list[BatchedWeight], amax: dict[str, float]) -> None:
    """Replace each found MatMul with QuantizeLinear + MatMulIntegerToFloat over its weight in int8, its
    activation at the calibrated range amax[x]; drop what fed the old B."""
    by_node = {f.node: f for f in found}

    def build(node, fresh):
        f = by_node[node.name]
        q, scale = quantize_batched(f.w)
        base = fresh(node.name, ("_Wq", "_Wscale", "_xscale", "_xzero", "_xq"))
        inits = [numpy_helper.from_array(q, f"{base}_Wq"), numpy_helper.from_array(scale, f"{base}_Wscale"),
                 numpy_helper.from_array(np.float32(amax[f.x] / 127.0), f"{base}_xscale"),
                 numpy_helper.from_array(np.int8(0), f"{base}_xzero")]  # fmt: skip
        quant = helper.make_node("QuantizeLinear", [f.x, f"{base}_xscale", f"{base}_xzero"], [f"{base}_xq"],
                                 name=f"{base}_quantize")  # fmt: skip
        matmul = helper.make_node("MatMulIntegerToFloat", [f"{base}_xq", f"{base}_Wq", f"{base}_xscale",
                                                           f"{base}_Wscale"], list(node.output), name=node.name,
                                  domain=MS_DOMAIN)  # fmt: skip
        return [quant, matmul], inits

    _substitute(model, set(by_node), build)
    remove_dead_nodes(model)


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes none of whose outputs is read (repeatedly), then initializers nothing reads."""
    nodes = list(model.graph.node)
    outputs = {o.name for o in model.graph.output}
    while True:
        read = {i for n in nodes for i in n.input} | outputs
        alive = [n for n in nodes if any(o in read for o in n.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    read = {i for n in nodes for i in n.input} | outputs
    keep = [t for t in model.graph.initializer if t.name in read]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
