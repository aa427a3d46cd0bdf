"""An int4 MTP graph as one node on nextn's CPU kernel (`kernels/mtp_module.c`).

An MTP module is one decoder layer and a head, but its int4 graph (the drafts `nextn calibrate --scheme int4`
writes, and the embedded model drafts with) is ~72 ONNX Runtime nodes: the mask, the rotary and the rows wanted
are built from the inputs at every call, then nine MatMulNBits, a QMoE, norms and the attention. On the embedded
model a draft cost 0.35 of a whole trunk step, most of it per-node overhead (BENCHMARKS.md). A session that
pre-packs (engines._load_forms) rewrites such a graph, when every part of it is found where the export puts it,
into one node

    nextn.MtpModule(input_ids, hidden, position_ids, attention_mask, past.c_kv, past.k_pe, output_rows,
                    embedding, weights uint8, params fp32, meta int64) -> logits, hidden_out, new.c_kv, new.k_pe

over the same inputs and outputs (export/io.py). Its weights are the graph's own values, laid out anew when the
session opens (a private copy, as pre-packing makes): each 4- or 8-bit matrix (the head may be 8-bit) in tiles
of 16 columns for VNNI's int8 dot products (`pack_matrix`); the norms, rotary frequencies, router, correction
bias, kv_b_proj (in the attention kernel's layout) and scalars in one fp32 array; and `meta` saying where each
lies (META_FIELDS, then six numbers per matrix: the kernel reads them by position). Any other MTP graph (fp32 or
int8 drafts, another structure, over MAX_GRAPH_BYTES) keeps its nodes; so does every graph where the kernel
library cannot be built. Where every MTP graph of an artifact is on the kernel, the decoder drafts through
NativeDrafter: a step's drafts in one call of the same kernel.

The kernel rounds each activation row to int8 per block as MatMulNBits and QMoE at accuracy level 4 do, and
sums the products in int32: the two agree to fp32 rounding (tests/runtime/test_mtp_module.py: 1e-4 of the
largest value), and a draft's value only ever decides whether it is accepted, never what is emitted. Where the
compiler does not target AVX512-VNNI the kernel's portable loop computes the same sums.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nextn.calib.rewrite import node_attributes
from nextn.errors import NextnError
from nextn.export import io
from nextn.export.latent_attention import DOMAIN as ATTENTION_DOMAIN
from nextn.export.latent_attention import OP_TYPE as ATTENTION_OP
from nextn.runtime.latent_attention import kernel_layout
from nextn.runtime.native import DOMAIN, use_kernel_nodes
from nextn.runtime.packed_blocks import BlockMatrix, from_nbits, pack_matrix
from nextn.runtime.routed_experts import plain_swiglu

OP_TYPE = "MtpModule"
VERSION = 1
# The largest MTP graph (its initializers' bytes) rewritten: the packed copy is stored in the serialized graph
# (protobuf's limit is 2 GiB) and unpacking holds ~3x the 4-bit bytes for a moment. What the kernel saves is
# per-node overhead, which is a draft's cost only where the module is small (the embedded model's: 0.6 MB;
# issue 14's 1 GB checkpoint's: ~30 MB); a DeepSeek-V3 MTP module (~6 GB at 4 bits) reads its weights'
# bytes for most of a draft and keeps ONNX Runtime's nodes.
MAX_GRAPH_BYTES = 256 << 20
# meta's first numbers, in the order the kernel reads them (META_* in kernels/mtp_module.c): the version, the
# dimensions, then the offsets of the fp32 parameters; then per matrix (MATRICES, then fc1 and fc2 of each expert)
# K, N, block size, bits, byte offset, float offset.
META_FIELDS = ("version", "hidden", "vocab", "kv_lora_rank", "rope_dim", "nope_dim", "v_dim", "heads", "q_lora_rank",
               "experts", "top_k", "n_group", "topk_group", "expert_inter", "shared_inter", "enorm", "hnorm",
               "input_layernorm", "kv_a_layernorm", "q_a_layernorm", "post_attention_layernorm", "head_norm",
               "inv_freq", "router", "correction_bias", "kv_b_proj", "scalars")  # fmt: skip
MATRICES = ("eh_proj", "kv_a_proj", "q_a_proj", "q_b_proj", "o_proj", "shared_gate_up", "shared_down", "head")
SCALARS = ("eps", "softmax_scale", "routed_scale", "rope_scale")
NORMS = {"enorm": ".enorm.weight", "hnorm": ".hnorm.weight", "input_layernorm": ".input_layernorm.weight",
         "kv_a_layernorm": ".self_attn.kv_a_layernorm.weight", "q_a_layernorm": ".self_attn.q_a_layernorm.weight",
         "post_attention_layernorm": ".post_attention_layernorm.weight",
         "head_norm": ".shared_head.norm.weight"}  # fmt: skip
MS = "com.microsoft"


@dataclass
class MtpParts:
    """What the kernel needs of one MTP graph, found by _find_parts."""

    dims: dict[str, int]
    norms: dict[str, np.ndarray]  # META_FIELDS' norm names -> weight
    matrices: dict[str, BlockMatrix]  # MATRICES -> matrix
    experts: list[tuple[BlockMatrix, BlockMatrix]]  # fc1 (gate columns, then up ones), fc2
    inv_freq: np.ndarray
    router: np.ndarray  # [E, H]
    bias: np.ndarray  # [E]
    kv_b: np.ndarray  # kv_b_proj in the attention kernel's layout, fp32
    scalars: dict[str, float]
    embedding: str  # the embedding's initializer name (the graph's, shared with the trunk)


@dataclass
class PackedModule:
    """What an MtpModule node reads besides the activations (its inputs 7 to 10), kept for NativeDrafter."""

    weights: np.ndarray  # uint8: the matrices, packed
    params: np.ndarray  # fp32: norms, rotary frequencies, router, bias, kv_b_proj, scalars, scales
    meta: np.ndarray  # int64: META_FIELDS, then each matrix's
    embedding: np.ndarray  # [V, H] fp32, the graph's own (a view of the weights file)


def use_mtp_module(model: onnx.ModelProto, array: Callable[[str], np.ndarray]) -> PackedModule | None:
    """Rewrite, in place, an int4 MTP graph to one nextn.MtpModule node (its packed weights stored in the graph);
    None, the graph untouched, where it is not one, or larger than MAX_GRAPH_BYTES."""
    if sum(_nbytes(t) for t in model.graph.initializer) > MAX_GRAPH_BYTES:
        return None
    parts = _find_parts(model, array)
    if parts is None:
        return None
    weights, params, meta = _pack(parts)
    prefix = f"{OP_TYPE}."
    inputs = [i.name for i in model.graph.input]
    node = helper.make_node(OP_TYPE, [*inputs, parts.embedding, f"{prefix}weights", f"{prefix}params", f"{prefix}meta"],
                            [o.name for o in model.graph.output], name=OP_TYPE, domain=DOMAIN)  # fmt: skip
    kept = [t for t in model.graph.initializer if t.name == parts.embedding]
    del model.graph.initializer[:], model.functions[:]
    use_kernel_nodes(model, [node])
    model.graph.initializer.extend([*kept, numpy_helper.from_array(weights, f"{prefix}weights"),
                                    numpy_helper.from_array(params, f"{prefix}params"),
                                    numpy_helper.from_array(meta, f"{prefix}meta")])  # fmt: skip
    return PackedModule(weights, params, meta, np.ascontiguousarray(array(parts.embedding), np.float32))


class _MtpWeights(ctypes.Structure):
    """kernels/mtp_module.c's MtpWeights: one module's packed weights."""

    _fields_ = [("meta", ctypes.c_void_p), ("n_meta", ctypes.c_int64), ("q", ctypes.c_void_p), ("n_q", ctypes.c_int64),
                ("f", ctypes.c_void_p), ("n_f", ctypes.c_int64), ("embed", ctypes.c_void_p), ("vocab", ctypes.c_int64),
                ("hidden", ctypes.c_int64)]  # fmt: skip

    @classmethod
    def of(cls, m: PackedModule) -> _MtpWeights:
        return cls(m.meta.ctypes.data, m.meta.size, m.weights.ctypes.data, m.weights.size, m.params.ctypes.data,
                   m.params.size, m.embedding.ctypes.data, *m.embedding.shape)  # fmt: skip


class NativeDrafter:
    """All of a step's drafts in one call of nextn's kernel library (`nextn_mtp_draft`, kernels/mtp_module.c):
    the decoder's drafting (decoder.py, Decoder._draft_tokens: each module's catch-up, its draft, the recursion
    with the last module) with every MTP call on the kernel and nothing between them, where each call went
    through Python and an ONNX Runtime run (~30 us a draft on the embedded model, a quarter of its cost). The
    same kernel computes the same values either way (tests/runtime/test_mtp_module.py)."""

    def __init__(self, library: Path, modules: list[PackedModule]):
        self.modules = modules  # the arrays the structs point into: kept alive as long
        self._weights = (_MtpWeights * len(modules))(*[_MtpWeights.of(m) for m in modules])
        fn = ctypes.CDLL(str(library)).nextn_mtp_draft
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, i64, p, p, p, p, i64, i64, p, p, i64, i64, i64, p]
        fn.restype = i64
        self._draft = fn

    def draft(self, st, k_total: int, chunk: int) -> list[int]:
        """k_total drafts after t_n for the sequence state `st` (decoder._State: fp32 caches), its MTP caches,
        hiddens and valid slots updated as the per-call path would."""
        view = st.native
        if view is None or len(view.drafts) < k_total:  # the state's arrays live as long as it does
            view = st.native = _NativeView.of(st, k_total)
        n, used = st.n, min(k_total, len(self.modules))
        lo = min(st.mtp_valid[:used]) + 1
        view.tokens[: n + 1 - lo] = st.tokens[lo : n + 1]
        view.valid[:] = st.mtp_valid
        got = self._draft(self._weights, len(self.modules), *view.caches, view.tokens_at, lo, n, view.hidden_at,
                          view.valid_at, k_total, chunk, st.max_len, view.drafts_at)  # fmt: skip
        if got != k_total:
            raise NextnError(f"nextn's MTP kernel could not draft {k_total} tokens at position {n} "
                             f"(context {st.max_len})")  # fmt: skip
        st.mtp_valid[:] = view.valid.tolist()
        return view.drafts[:k_total].tolist()


@dataclass
class _NativeView:
    """A sequence state's arrays as the kernel call takes them: addresses taken once (numpy's `.ctypes.data`
    is ~1.5 us an access, and a draft call took 4 of them and 3 new arrays: ~27 us of Python around a ~190 us
    kernel call at K = 3 on the embedded model), and buffers for the call's tokens, valid slots and drafts."""

    caches: tuple  # ctypes arrays of the MTP caches' addresses: c_kv, k_pe and hidden per module
    hidden_at: int  # the trunk's hidden states [max_len, H]
    tokens: np.ndarray  # [max_len + 1] int64: the tokens the call reads
    valid: np.ndarray  # [modules] int64: each module's valid slots, read and written by the call
    drafts: np.ndarray  # [>= k_total] int64: what the call drafts
    tokens_at: int = 0
    valid_at: int = 0
    drafts_at: int = 0

    def __post_init__(self):
        self.tokens_at, self.valid_at, self.drafts_at = (a.ctypes.data for a in (self.tokens, self.valid, self.drafts))

    @classmethod
    def of(cls, st, k_total: int) -> _NativeView:
        caches = tuple((ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
                       for arrays in (st.mtp_c, st.mtp_k, st.mtp_hidden))  # fmt: skip
        return cls(caches, st.hidden.ctypes.data, np.zeros(st.max_len + 1, np.int64),
                   np.zeros(len(st.mtp_valid), np.int64), np.zeros(max(k_total, 8), np.int64))  # fmt: skip


def native_drafter(engines, n_mtp: int, dtype: np.dtype) -> NativeDrafter | None:
    """A NativeDrafter where every MTP graph of `engines` runs on the kernel (and the caches are fp32), else None."""
    from nextn.runtime.native import kernel_library

    packed = [getattr(engines.get(f"mtp_{k}"), "mtp_module", None) for k in range(n_mtp)]
    if not packed or not all(packed) or np.dtype(dtype) != np.float32:
        return None
    library = kernel_library()
    return NativeDrafter(library, packed) if library else None


def _nbytes(t: onnx.TensorProto) -> int:
    """An initializer's bytes, from its declaration (nothing is read)."""
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _pack(p: MtpParts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights uint8, params fp32, meta int64): the kernel's three inputs."""
    floats: list[np.ndarray] = []
    size = 0

    def put(a: np.ndarray) -> int:
        nonlocal size
        floats.append(np.asarray(a, np.float32).reshape(-1))
        size += floats[-1].size
        return size - floats[-1].size

    d = p.dims
    offsets = {name: put(p.norms[name]) for name in NORMS}
    offsets.update(inv_freq=put(p.inv_freq), router=put(p.router), correction_bias=put(p.bias), kv_b_proj=put(p.kv_b),
                   scalars=put(np.array([p.scalars[s] for s in SCALARS], np.float32)))  # fmt: skip
    meta = [VERSION, *(d[f] for f in META_FIELDS[1:15]), *(offsets[f] for f in META_FIELDS[15:])]
    data: list[np.ndarray] = []
    nbytes = 0
    for m in [*(p.matrices[name] for name in MATRICES), *(m for pair in p.experts for m in pair)]:
        q, s = pack_matrix(m)
        meta += [m.k, m.n, m.block, m.bits, nbytes, put(s)]
        data.append(q)
        nbytes += q.size
    return np.concatenate(data), np.concatenate(floats), np.array(meta, np.int64)


class _Graph:
    """Producers and users of each value, the initializers and small helpers to walk a graph."""

    def __init__(self, model: onnx.ModelProto, array: Callable[[str], np.ndarray]):
        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.users: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.users.setdefault(i, []).append(n)
        self.inits = {t.name for t in model.graph.initializer}
        self.array = array

    def user(self, value: str, op: str) -> onnx.NodeProto | None:
        found = [n for n in self.users.get(value, []) if n.op_type == op]
        return found[0] if len(found) == 1 else None

    def norm(self, suffix: str) -> onnx.NodeProto | None:
        found = [n for n in self.nodes if n.op_type in ("RMSNormalization", "SkipSimplifiedLayerNormalization")
                 and any(i.endswith(suffix) and i in self.inits for i in n.input)]  # fmt: skip
        return found[0] if len(found) == 1 else None

    def matrix(self, node: onnx.NodeProto | None) -> BlockMatrix | None:
        if node is None or node.op_type != "MatMulNBits" or node.domain != MS:
            return None
        a = node_attributes(node)
        if a.get("bits") not in (4, 8) or len(node.input) < 3 or any(i not in self.inits for i in node.input[1:4] if i):
            return None
        zp = self.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        return from_nbits(self.array(node.input[1]), self.array(node.input[2]), zp, a["K"], a["N"], a["block_size"],
                          a["bits"])  # fmt: skip

    def scalar(self, node: onnx.NodeProto | None) -> float | None:
        """The constant factor of a Mul node by a one-element initializer."""
        if node is None or node.op_type != "Mul":
            return None
        consts = [i for i in node.input if i in self.inits and self.array(i).size == 1]
        return float(self.array(consts[0]).reshape(())) if len(consts) == 1 else None


def _find_parts(model: onnx.ModelProto, array: Callable[[str], np.ndarray]) -> MtpParts | None:
    """Every part of the module where the export and the int4 calibration put it, or None."""
    if [i.name for i in model.graph.input] != list(io.mtp_feed(*[None] * 6, output_rows=0)):
        return None
    if [o.name for o in model.graph.output] != io.MTP_OUTPUTS:
        return None
    g = _Graph(model, array)
    norms = {name: g.norm(suffix) for name, suffix in NORMS.items()}
    attention = [n for n in g.nodes if (n.domain, n.op_type) == (ATTENTION_DOMAIN, ATTENTION_OP)]
    qmoe = [n for n in g.nodes if (n.domain, n.op_type) == (MS, "QMoE")]
    if any(n is None for n in norms.values()) or len(attention) != 1 or len(qmoe) != 1:
        return None
    if sum(n.op_type == "MatMulNBits" for n in g.nodes) != 9:
        return None
    attention, qmoe = attention[0], qmoe[0]
    embed = g.producer.get(norms["enorm"].input[0])
    if embed is None or embed.op_type != "Gather" or embed.input[1] != io.INPUT_IDS or embed.input[0] not in g.inits:
        return None
    cat = g.producer.get(g.producer[norms["input_layernorm"].input[0]].input[0]
                         if norms["input_layernorm"].input[0] in g.producer else "")  # fmt: skip
    if (norms["hnorm"].input[0] != io.HIDDEN or cat is None or cat.op_type != "Concat"
            or list(cat.input) != [norms["enorm"].output[0], norms["hnorm"].output[0]]):  # fmt: skip
        return None
    post = norms["post_attention_layernorm"].output[0]
    shared = [n for n in g.users.get(post, []) if n.op_type == "MatMulNBits"]
    gate = [n for n in shared if g.user(n.output[0], "Sigmoid") is not None]
    if len(shared) != 2 or len(gate) != 1:
        return None
    up = shared[1 - shared.index(gate[0])]
    product = g.user(up.output[0], "Mul")
    matrices = {
        "eh_proj": g.matrix(g.producer.get(norms["input_layernorm"].input[0])),
        "kv_a_proj": g.matrix(g.producer.get(g.producer[norms["kv_a_layernorm"].input[0]].input[0])
                              if norms["kv_a_layernorm"].input[0] in g.producer else None),
        "q_a_proj": g.matrix(g.producer.get(norms["q_a_layernorm"].input[0])),
        "q_b_proj": g.matrix(g.user(norms["q_a_layernorm"].output[0], "MatMulNBits")),
        "o_proj": g.matrix(g.user(attention.output[0], "MatMulNBits")),
        "shared_down": g.matrix(g.user(product.output[0], "MatMulNBits") if product is not None else None),
        "head": g.matrix(g.producer.get(io.LOGITS)),
    }  # fmt: skip
    gate_m, up_m = g.matrix(gate[0]), g.matrix(up)
    if any(m is None for m in matrices.values()) or gate_m is None or up_m is None or gate_m.block != up_m.block:
        return None
    if gate_m.bits != up_m.bits:
        return None
    matrices["shared_gate_up"] = BlockMatrix(
        np.concatenate([gate_m.q, up_m.q]), np.concatenate([gate_m.scale, up_m.scale]),
        np.concatenate([gate_m.zero, up_m.zero]), gate_m.block, gate_m.bits)  # fmt: skip
    moe_input = qmoe.input[0]
    while moe_input in g.producer and g.producer[moe_input].op_type == "Reshape":
        moe_input = g.producer[moe_input].input[0]
    moe = _moe_parts(g, qmoe) if moe_input == post else None
    rotary = _rotary_parts(g)
    if moe is None or rotary is None or g.producer.get(io.HIDDEN_OUT) is not norms["head_norm"]:
        return None
    a = node_attributes(attention)
    eps = {float(node_attributes(n).get("epsilon", 1e-5)) for n in norms.values()}
    kv_b = array(attention.input[8]).astype(np.float32)
    heads, nope, v, r, d = (int(a[k]) for k in ("num_heads", "nope_dim", "v_dim", "latent_dim", "rope_dim"))
    hidden, vocab = matrices["eh_proj"].n, matrices["head"].n
    router, bias, experts, top_k, n_group, topk_group, routed = moe
    dims = {"hidden": hidden, "vocab": vocab, "kv_lora_rank": r, "rope_dim": d, "nope_dim": nope, "v_dim": v,
            "heads": heads, "q_lora_rank": matrices["q_a_proj"].n, "experts": len(experts), "top_k": top_k,
            "n_group": n_group, "topk_group": topk_group, "expert_inter": experts[0][1].k,
            "shared_inter": gate_m.n}  # fmt: skip
    if len(eps) != 1 or kv_b.shape != (heads * (nope + v), r) or rotary[0].size != d // 2:
        return None
    every = [*matrices.values(), *(m for pair in experts for m in pair)]
    if any(m.k % 8 or m.block % 8 for m in every):  # VNNI's groups of 4 rows, two groups a byte
        return None
    weights = {n: array(node.input[1 if node.op_type == "RMSNormalization" else 2]) for n, node in norms.items()}
    return MtpParts(dims, weights,
                    matrices, experts, rotary[0], router, bias, kernel_layout(kv_b, heads, nope, v),
                    {"eps": eps.pop(), "softmax_scale": float(a["scale"]), "routed_scale": routed,
                     "rope_scale": rotary[1]}, embed.input[0])  # fmt: skip


def _moe_parts(g: _Graph, qmoe: onnx.NodeProto):
    """(router [E, H], bias, experts, top_k, n_group, topk_group, routed scale) of the graph's QMoE and its router,
    or None where they are not DeepSeek-V3's routing and SwiGLU experts in 4 bits."""
    a = node_attributes(qmoe)
    swiglu = plain_swiglu(a) and a.get("expert_weight_bits") in (4, 8) and a.get("normalize_routing_weights", 0) == 0
    ins = list(qmoe.input) + [""] * (13 - len(qmoe.input))
    router = g.producer.get(ins[1])
    logits = g.producer.get(router.input[0]) if router is not None else None
    if (not swiglu or router is None or router.op_type != "MoEGroupRouter" or logits is None
            or logits.op_type != "MatMul" or logits.input[1] not in g.inits
            or any(ins[i] for i in (4, 7, 8, 9, 10))):  # fmt: skip
        return None
    r = node_attributes(router)
    routed = g.scalar(g.user(qmoe.output[0], "Mul"))
    if routed is None or r.get("group_topk", 2) != 2 or r.get("top_k") != a.get("k"):
        return None
    fc1, fc1_s, fc2, fc2_s = (g.array(ins[i]) for i in (2, 3, 5, 6))
    fc1_z, fc2_z = (g.array(ins[i]) if ins[i] else None for i in (11, 12))
    bits, per_byte = int(a["expert_weight_bits"]), 8 // int(a["expert_weight_bits"])
    n_experts, two_i, hidden = fc1.shape[0], fc1.shape[1], fc1.shape[2] * per_byte
    inter, block = two_i // 2, int(a.get("block_size", 0))
    if block < 1 or fc2.shape[:2] != (n_experts, hidden) or fc2.shape[2] * per_byte != inter:
        return None
    order = np.concatenate([np.arange(0, two_i, 2), np.arange(1, two_i, 2)])  # gate rows, then up rows
    def zero(z, e):
        return None if z is None else z[e]

    experts = [(from_nbits(fc1[e], fc1_s[e], zero(fc1_z, e), hidden, two_i, block, bits).columns(order),
                from_nbits(fc2[e], fc2_s[e], zero(fc2_z, e), inter, hidden, block, bits))
               for e in range(n_experts)]  # fmt: skip
    router_wt = g.array(logits.input[1]).astype(np.float32)  # [H, E]
    has_bias = len(router.input) > 1 and router.input[1]
    bias = g.array(router.input[1]).astype(np.float32) if has_bias else np.zeros(n_experts, np.float32)
    n_group, topk_group = int(r.get("n_group", 1)), int(r.get("topk_group", 1))
    if router_wt.shape != (hidden, n_experts) or n_experts % n_group or n_experts > 256:
        return None
    return np.ascontiguousarray(router_wt.T), bias, experts, int(r["top_k"]), n_group, topk_group, routed


def _rotary_parts(g: _Graph) -> tuple[np.ndarray, float] | None:
    """(inv_freq [D/2], the scale of cos and sin) of the k_pe rotary: RotaryEmbedding (halves layout) over
    cos(position_ids inv_freq) and sin(...), each maybe times a constant; None otherwise."""
    rotary = [n for n in g.nodes if n.op_type == "RotaryEmbedding"]
    if len(rotary) != 1 or node_attributes(rotary[0]).get("interleaved", 0) != 0 or len(rotary[0].input) != 3:
        return None
    found = []
    for value, op in ((rotary[0].input[1], "Cos"), (rotary[0].input[2], "Sin")):
        node, scale = g.producer.get(value), 1.0
        if node is not None and node.op_type == "Mul":
            scale = g.scalar(node)
            node = g.producer.get(next((i for i in node.input if i not in g.inits), ""))
        if scale is None or node is None or node.op_type != op:
            return None
        angle = g.producer.get(node.input[0])
        if angle is None or angle.op_type != "Mul" or sum(i in g.inits for i in angle.input) != 1:
            return None
        source = next(i for i in angle.input if i not in g.inits)
        while source in g.producer and g.producer[source].op_type in ("Cast", "Unsqueeze"):
            source = g.producer[source].input[0]
        if source != io.POSITION_IDS:
            return None
        freq = next(i for i in angle.input if i in g.inits)
        found.append((freq, scale, angle.name))
    if found[0] != found[1]:
        return None
    return g.array(found[0][0]).astype(np.float32).reshape(-1), found[0][1]
