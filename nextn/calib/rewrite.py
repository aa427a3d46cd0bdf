"""Graph rewrites: which matrix multiplications get quantized, and the quantized forms they become.

A *linear* is a MatMul(x, W[K, N]) or Gemm(x, W[N, K], transB=1) whose weight is an initializer. The
MoE router (a linear whose output only feeds Sigmoid, Softmax or MoEGroupRouter) is never one: its scores pick experts, and
a flipped top-k choice moves the output by O(1). Softmax, residual adds, norms, the mask and the
attention score/value products (no constant weight) stay in float.

int8 / fp8 (static Q/DQ, the explicit-quantization form TensorRT consumes; ONNX Runtime CPU fuses the
int8 form into MatMulIntegerToFloat):

        x ─ QuantizeLinear(s_x, 0) ─ DequantizeLinear(s_x, 0) ─┐        one Q/DQ pair per activation,
                                                              MatMul ─ y   shared by every linear reading it
        W_q[K, N] ─ DequantizeLinear(s_w, 0, axis=1) ─────────┘
    int8: symmetric, s_x = amax / 127 per tensor (calibrated), s_w = max|W[:, n]| / 127 per output channel.
    fp8:  float8 e4m3fn, s_x = amax / 448 per tensor, s_w = max|W| / 448 per tensor (TensorRT's FP8 GEMMs
          take per-tensor scales).

int4 (weight-only, ONNX Runtime contrib op, for CPU decoding):

        x ─ MatMulNBits(B[N, K/bs, bs/2] uint8, scales[N * K/bs], zero_points) ─ y
    asymmetric 4-bit per block of `bs` input channels, round-to-nearest or GPTQ (gptq.py); accuracy_level
    4 lets ONNX Runtime multiply in int8 (activations quantized per block on the fly). The output head
    takes 8 bits by default (same op, bits=8): it is the one linear whose error lands on the logits
    unmixed, and 4 bits there cost the embedded model ~2 points of top-1 agreement (BENCHMARKS.md).

Fused MoE experts (export --moe fused; experts.py computes their weights):

        MoE(x, router_probs, w13, w2) ─► QMoE(x, router_probs, fc1 [E, 2I, H*bits/8] + scales + zero points,
                                              fc2 [E, H, I*bits/8] + scales + zero points)
    per expert the bytes of MatMulNBits (rows = output channels, K packed), stacked over experts; routing and
    SwiGLU attributes carry over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

FP8_MAX = 448.0  # largest finite float8 e4m3fn
INT8_MAX = 127.0
MS_DOMAIN = "com.microsoft"
ROUTER_OPS = ("Sigmoid", "Softmax", "MoEGroupRouter")


@dataclass(frozen=True)
class Linear:
    node: str  # node name (unique in the graph)
    op: str  # "MatMul" | "Gemm"
    x: str  # activation input
    w: str  # weight initializer
    k: int  # input features
    n: int  # output features
    transposed: bool  # Gemm transB=1: the weight is stored [N, K]
    head: bool = False  # produces a graph output (the logits)


def initializers_read_once(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The initializers exactly one node input reads, by name: the ones a rewrite of that node may lay out
    anew without changing what another node sees."""
    reads: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            reads[name] = reads.get(name, 0) + 1
    return {t.name: t for t in model.graph.initializer if reads.get(t.name) == 1}


def feeds_only_routers(users: list[onnx.NodeProto]) -> bool:
    """Whether a linear whose output goes to `users` is a MoE router: its scores pick experts, so it stays
    exactly as exported (SiLU's Sigmoid has a Mul beside it, so a gate projection is not one)."""
    return bool(users) and all(c.op_type in ROUTER_OPS for c in users)


def node_attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes, name -> value."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def node_readers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Each value's name -> the nodes that read it, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def is_router_product(node: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]]) -> bool:
    """feeds_only_routers for what reads `node`'s outputs (`readers`: node_readers of its graph)."""
    return feeds_only_routers([r for o in node.output for r in readers.get(o, [])])


def find_linears(model: onnx.ModelProto) -> tuple[list[Linear], list[str]]:
    """The graph's quantizable linears, and the names of the router linears left in float."""
    inits = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    readers = node_readers(model)
    found, routers = [], []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        if len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT:
            continue
        attrs = node_attributes(node)
        if node.op_type == "Gemm":
            plain = attrs.get("alpha", 1.0) == 1.0 and not attrs.get("transA", 0) and len(node.input) == 2
            if not plain or not attrs.get("transB", 0):
                continue
        if is_router_product(node, readers):  # MatMul and Gemm have one output
            routers.append(node.name)
            continue
        transposed = node.op_type == "Gemm"
        n, k = w.dims if transposed else w.dims[::-1]
        found.append(Linear(node.name, node.op_type, node.input[0], w.name, int(k), int(n), transposed,
                            head=node.output[0] in outputs))  # fmt: skip
    return found, routers


def weight_kn(model: onnx.ModelProto, lin: Linear, read=numpy_helper.to_array) -> np.ndarray:
    """The weight as [K, N] float32; `read` turns its initializer into an array (the default needs the
    graph's tensors loaded; streaming.TensorReader reads one external tensor from disk)."""
    t = next(t for t in model.graph.initializer if t.name == lin.w)
    w = read(t).astype(np.float32, copy=False)
    return np.ascontiguousarray(w.T) if lin.transposed else w


# -- int8 / fp8 --------------------------------------------------------------------------------------
def quantize_weight_qdq(w: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> (W_q, scale): int8 per output channel [N], or fp8 e4m3fn per tensor (scalar)."""
    if fmt == "int8":
        amax = np.abs(w).max(axis=0)  # [N]
        scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
        return np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8), scale
    amax = float(np.abs(w).max())
    scale = np.float32(amax / FP8_MAX if amax > 0 else 1.0)
    return (w / scale).astype(ml_dtypes.float8_e4m3fn), np.asarray(scale, np.float32)


def activation_scale(amax: float, fmt: str) -> np.float32:
    return np.float32(amax / (INT8_MAX if fmt == "int8" else FP8_MAX))


def _activation_zero(fmt: str) -> np.ndarray:
    """int8 activations travel as uint8 with zero point 128: the same 255-level symmetric grid as int8
    with zero point 0 (q_u8 = q_s8 + 128 exactly), and the form ONNX Runtime's CPU kernels fuse
    (MatMulIntegerToFloat); with int8 activations it leaves most MatMuls as float DQ + MatMul."""
    return np.asarray(128, np.uint8) if fmt == "int8" else _zero(fmt, ())


def _zero(fmt: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, np.int8 if fmt == "int8" else ml_dtypes.float8_e4m3fn)


def apply_qdq(model: onnx.ModelProto, linears: list[Linear], act_amax: dict[str, float], fmt: str,
              read=numpy_helper.to_array, spill=None) -> None:  # fmt: skip
    """Rewrite `linears` (each with a calibrated activation in `act_amax`) into the Q/DQ form, in place.
    `read` and `spill` as for apply_nbits: each weight read when its node is reached, its quantized
    tensors moved to disk as they are made."""
    by_node = {lin.node: lin for lin in linears}
    inits = {t.name: t for t in model.graph.initializer}
    new_inits: list[onnx.TensorProto] = []
    act_done: dict[str, str] = {}  # activation -> its dequantized name
    nodes = []
    fresh = _fresh(model)
    act_sfx = ("_scale", "_zero", "_q", "_dq", "_QuantizeLinear", "_DequantizeLinear")
    w_sfx = ("_w_q", "_w_scale", "_w_zero", "_w_dq", "_w_DequantizeLinear")
    for node in model.graph.node:
        lin = by_node.get(node.name)
        if lin is None:
            nodes.append(node)
            continue
        if lin.x not in act_done:
            base = fresh(lin.x, act_sfx)
            new_inits += [numpy_helper.from_array(np.asarray(activation_scale(act_amax[lin.x], fmt)), f"{base}_scale"),
                          numpy_helper.from_array(_activation_zero(fmt), f"{base}_zero")]  # fmt: skip
            nodes += [
                helper.make_node("QuantizeLinear", [lin.x, f"{base}_scale", f"{base}_zero"], [f"{base}_q"],
                                 name=f"{base}_QuantizeLinear"),  # fmt: skip
                helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zero"], [f"{base}_dq"],
                                 name=f"{base}_DequantizeLinear"),  # fmt: skip
            ]
            act_done[lin.x] = f"{base}_dq"
        wq, ws = quantize_weight_qdq(weight_kn(model, lin, read), fmt)
        wb = fresh(lin.node, w_sfx)
        made = [numpy_helper.from_array(wq, f"{wb}_w_q"), numpy_helper.from_array(ws, f"{wb}_w_scale"),
                numpy_helper.from_array(_zero(fmt, ws.shape), f"{wb}_w_zero")]  # fmt: skip
        new_inits += [spill(t) for t in made] if spill is not None else made
        axis = {"axis": 1} if ws.ndim == 1 else {}
        nodes += [
            helper.make_node("DequantizeLinear", [f"{wb}_w_q", f"{wb}_w_scale", f"{wb}_w_zero"], [f"{wb}_w_dq"],
                             name=f"{wb}_w_DequantizeLinear", **axis),  # fmt: skip
            helper.make_node("MatMul", [act_done[lin.x], f"{wb}_w_dq"], list(node.output), name=node.name),
        ]
    _replace(model, nodes, new_inits, inits)


# -- int4 --------------------------------------------------------------------------------------------
@dataclass
class BlockWeight:
    """Asymmetric blockwise weight of `bits` bits: q [K, N] in 0..2^bits-1, scale and zero [K/bs, N]."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    block_size: int
    bits: int = 4

    def dequantize(self) -> np.ndarray:
        rows = np.arange(self.q.shape[0]) // self.block_size
        return (self.q.astype(np.float32) - self.zero[rows]) * self.scale[rows]


def block_params(w: np.ndarray, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of asymmetric blocks: w [..., bs, N] -> ([..., N], [..., N]).
    The range always holds 0, so zero weights stay exact."""
    top = 2**bits - 1
    lo = np.minimum(w.min(axis=-2), 0.0)
    hi = np.maximum(w.max(axis=-2), 0.0)
    scale = (hi - lo) / top
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, top).astype(np.float32)
    return scale, zero


def quantize_rtn(w: np.ndarray, block_size: int, bits: int = 4) -> BlockWeight:
    """Round to nearest: W [K, N] -> BlockWeight."""
    k, n = w.shape
    pad = -k % block_size
    wp = np.concatenate([w, np.zeros((pad, n), np.float32)]) if pad else w
    blocks = wp.reshape(-1, block_size, n)  # [K/bs, bs, N]
    scale, zero = block_params(blocks, bits)
    q = np.clip(np.rint(blocks / scale[:, None]) + zero[:, None], 0, 2**bits - 1).astype(np.uint8)
    return BlockWeight(q.reshape(-1, n)[:k], scale, zero, block_size, bits)


def pack_matmulnbits(w: BlockWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX Runtime's MatMulNBits layout: B [N, n_blocks, bs * bits / 8] (4 bits: element 2j in the low
    nibble), scales [N * n_blocks], zero_points [N * ceil(n_blocks * bits / 8)] (4 bits: two per byte, low
    nibble first)."""
    k, n = w.q.shape
    bs = w.block_size
    nb = -(-k // bs)
    q = np.empty((nb * bs, n), np.uint8)
    q[:k] = w.q
    q[k:] = w.zero[-1].astype(np.uint8)  # padding rows: never read (K is an attribute)
    q = q.T.reshape(n, nb, bs)  # [N, n_blocks, bs]
    zero = w.zero.T.astype(np.uint8)  # [N, n_blocks]
    if w.bits == 8:
        return np.ascontiguousarray(q), np.ascontiguousarray(w.scale.T).reshape(-1), zero.reshape(-1)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    if nb % 2:
        zero = np.concatenate([zero, np.zeros((n, 1), np.uint8)], axis=1)
    zp = zero[:, 0::2] | (zero[:, 1::2] << 4)
    return np.ascontiguousarray(packed), np.ascontiguousarray(w.scale.T).reshape(-1), zp.reshape(-1)


def apply_nbits(model: onnx.ModelProto, weights: Mapping[str, tuple[Linear, BlockWeight]], accuracy_level: int = 4,
                spill=None) -> None:  # fmt: skip
    """Replace each linear (by node name) with MatMulNBits over its packed blockwise weight, in place.
    `weights` may compute each entry when asked (one linear in memory at a time); `spill` (a tensor proto
    -> the same, its data moved to disk) is applied to each new initializer as it is made."""

    def build(node, fresh):
        lin, w = weights[node.name]
        b, scales, zp = pack_matmulnbits(w)
        base = fresh(node.name, (f"_B{w.bits}", "_scales", "_zero_points"))
        inits = [numpy_helper.from_array(b, f"{base}_B{w.bits}"), numpy_helper.from_array(scales, f"{base}_scales"),
                 numpy_helper.from_array(zp, f"{base}_zero_points")]  # fmt: skip
        return helper.make_node(
            "MatMulNBits", [lin.x, f"{base}_B{w.bits}", f"{base}_scales", f"{base}_zero_points"], list(node.output),
            name=node.name, domain=MS_DOMAIN, K=lin.k, N=lin.n, bits=w.bits, block_size=w.block_size,
            accuracy_level=accuracy_level,
        ), inits  # fmt: skip

    _substitute(model, set(weights), build, spill)


# -- fused MoE experts (export --moe fused) -----------------------------------------------------------
@dataclass(frozen=True)
class Experts:
    """One com.microsoft.MoE node: routed experts stacked, fc1 = gate/up interleaved, fc2 = down."""

    node: str
    x: str  # input [N, H]
    probs: str  # router_probs [N, E]: finite at the picked experts
    w13: str  # [E, 2I, H]
    w2: str  # [E, H, I]
    n_experts: int
    hidden: int
    inter: int


def find_experts(model: onnx.ModelProto) -> list[Experts]:
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "MoE" or node.domain != MS_DOMAIN:
            continue
        w13, w2 = inits[node.input[2]], inits[node.input[4]]
        e, h, i = (int(d) for d in w2.dims)
        found.append(Experts(node.name, node.input[0], node.input[1], w13.name, w2.name, e, h, i))
    return found


def pack_qmoe(weights: list[BlockWeight]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """QMoE's raw layout from one BlockWeight per expert (W [K, N]): weights [E, N, K * bits / 8], scales
    [E, N, K / bs], zero points [E, N, ceil(K / bs * bits / 8)]; per expert the bytes of MatMulNBits."""
    packed = [pack_matmulnbits(w) for w in weights]
    k, n = weights[0].q.shape
    return (np.stack([b.reshape(n, -1) for b, _, _ in packed]), np.stack([s.reshape(n, -1) for _, s, _ in packed]),
            np.stack([z.reshape(n, -1) for _, _, z in packed]))  # fmt: skip


def apply_qmoe(model: onnx.ModelProto, experts: Mapping[str, tuple[list[BlockWeight], list[BlockWeight]]],
               accuracy_level: int = 4, spill=None) -> None:  # fmt: skip
    """Replace each MoE node (by name) with QMoE over its experts' (fc1, fc2) blockwise weights, in place.
    Every other input and attribute (routing, SwiGLU layout) carries over; `experts` and `spill` as in
    apply_nbits."""

    def build(node, fresh):
        fc1, fc2 = experts[node.name]
        inits, names = [], []
        for which, ws in (("fc1", fc1), ("fc2", fc2)):
            base = fresh(f"{node.name}_{which}", ("_q", "_scales", "_zero_points"))
            inits += [numpy_helper.from_array(arr, f"{base}{sfx}")
                      for arr, sfx in zip(pack_qmoe(ws), ("_q", "_scales", "_zero_points"))]  # fmt: skip
            names.append(base)
        attrs = node_attributes(node)
        return helper.make_node(
            "QMoE", [node.input[0], node.input[1], f"{names[0]}_q", f"{names[0]}_scales", "", f"{names[1]}_q",
                     f"{names[1]}_scales", "", "", "", "", f"{names[0]}_zero_points", f"{names[1]}_zero_points"],
            list(node.output), name=node.name, domain=MS_DOMAIN, **attrs, expert_weight_bits=fc1[0].bits,
            block_size=fc1[0].block_size, accuracy_level=accuracy_level,
        ), inits  # fmt: skip

    _substitute(model, set(experts), build, spill)


# -- helpers -----------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")


def _fresh(model: onnx.ModelProto):
    """A namer for new tensors: `_safe(name)`, suffixed until it clashes with no name in the graph."""
    taken = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    taken |= {o for n in model.graph.node for o in n.output} | {n.name for n in model.graph.node}

    def base(name: str, suffixes: tuple[str, ...]) -> str:
        b, i = _safe(name), 0
        while any(f"{b}{sfx}" in taken for sfx in suffixes):
            i += 1
            b = f"{_safe(name)}_{i}"
        taken.update(f"{b}{sfx}" for sfx in suffixes)
        return b

    return base


def _substitute(model: onnx.ModelProto, names: set[str], build, spill=None) -> None:
    """Replace the nodes named in `names` by `build(node, fresh) -> (new node, its new initializers)`, in
    place; initializers no node reads any more are dropped; the com.microsoft opset is imported."""
    inits = {t.name: t for t in model.graph.initializer}
    new_inits, nodes = [], []
    fresh = _fresh(model)
    for node in model.graph.node:
        if node.name not in names:
            nodes.append(node)
            continue
        new, more = build(node, fresh)
        nodes.append(new)
        new_inits += [spill(t) for t in more] if spill is not None else more
    _replace(model, nodes, new_inits, inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _replace(model: onnx.ModelProto, nodes: list, new_inits: list, inits: dict) -> None:
    """Install the new node list and initializers; drop initializers no node reads any more."""
    used = {i for n in nodes for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in inits.values() if t.name in used]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new_inits)
    # shapes of rewritten values are re-inferred by the runtime; stale entries would only mislead
    del model.graph.value_info[:]
