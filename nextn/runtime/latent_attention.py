"""MLA's absorbed attention on nextn's own CPU kernel (`kernels/latent_attention.c`), one node a layer.

The export writes each fp32 attention layer as one `nextn.MlaAttention` node whose body is a model-local ONNX
function (export/latent_attention.py); ONNX Runtime alone inlines that body, ~35 nodes a layer. A session that
pre-packs (engines._load_forms) instead rewrites each node

    nextn.MlaAttention(q, cos, sin, mask, past_c, past_k, new_c, new_k, kv_b_proj)
 -> nextn.LatentAttention(the same inputs)          (LatentAttentionBf16: kv_b_proj as bf16 bit patterns)

and drops the function: the same arithmetic in one kernel call, each query row's sums in an order that does not
depend on the other rows or the threads. kv_b_proj (which no other node reads) is laid out anew for the kernel
(`kernel_layout`, a private copy made when the session opens, like the routed experts' stacks); where it holds
bfloat16 values (a bf16 checkpoint exported in fp32, as the embedded model and DeepSeek-V3 are) the node is
LatentAttentionBf16 and the copy holds their bit patterns: half the bytes, the same values. Without the kernel library (native.py) the graph keeps the
function.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from nextn.calib.rewrite import initializers_read_once, node_attributes
from nextn.export.latent_attention import DOMAIN as EXPORT_DOMAIN
from nextn.export.latent_attention import OP_TYPE as EXPORT_OP_TYPE
from nextn.runtime.native import DOMAIN, retype
from nextn.runtime.routed_experts import bf16_bits, is_bf16

OP_TYPE = "LatentAttention"
OP_TYPE_BF16 = "LatentAttentionBf16"
KERNEL_ATTRIBUTES = ("num_heads", "nope_dim", "v_dim", "scale")


def use_latent_attention(model: onnx.ModelProto, array: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Rewrite, in place, every MlaAttention node onto the kernel (and drop the function where no node calls it
    any more); returns the kv_b_proj weights in the kernel's layout, by initializer name, to hand to the
    session in place of the file's."""
    own = initializers_read_once(model)
    stacks: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        name = node.input[8] if (node.domain, node.op_type) == (EXPORT_DOMAIN, EXPORT_OP_TYPE) else None
        if name not in own or own[name].data_type != onnx.TensorProto.FLOAT:
            continue  # not an attention node, or its weight is shared: it keeps the function
        attrs = node_attributes(node)
        weight = array(name)  # [nh (dn + dv), R]
        if not _fits(attrs, weight.shape):
            continue  # not the shapes the export writes: the function computes it (and reports what is wrong)
        w = kernel_layout(weight, attrs["num_heads"], attrs["nope_dim"], attrs["v_dim"])
        bf16 = is_bf16(w)
        stacks[name] = bf16_bits(w) if bf16 else w
        retype(own[name], stacks[name])
        kernel = helper.make_node(OP_TYPE_BF16 if bf16 else OP_TYPE, list(node.input), list(node.output),
                                  name=node.name, domain=DOMAIN, **{k: attrs[k] for k in KERNEL_ATTRIBUTES})  # fmt: skip
        node.CopyFrom(kernel)
    if stacks and not any((n.domain, n.op_type) == (EXPORT_DOMAIN, EXPORT_OP_TYPE) for n in model.graph.node):
        kept = [f for f in model.functions if (f.domain, f.name) != (EXPORT_DOMAIN, EXPORT_OP_TYPE)]
        del model.functions[:]
        model.functions.extend(kept)
    if stacks:
        del model.graph.value_info[:]
    return stacks


def kernel_layout(w: np.ndarray, heads: int, nope: int, v: int) -> np.ndarray:
    """kv_b_proj [nh (dn + dv), R] -> [nh, (dn + dv) R]: per head W_UK [dn, R] as it is, then W_UV transposed,
    [R, dv], so that both of the kernel's per-head products read their weight row by row. A copy; the same
    values."""
    r = w.shape[-1]
    w3 = w.reshape(heads, nope + v, r)
    out = np.empty((heads, (nope + v) * r), w.dtype)
    out[:, : nope * r] = w3[:, :nope].reshape(heads, -1)
    out[:, nope * r :] = w3[:, nope:].transpose(0, 2, 1).reshape(heads, -1)
    return out


def _fits(attrs: dict, shape: tuple) -> bool:
    """Whether a node's attributes and kv_b_proj's shape are the kernel's contract: [nh (dn + dv), R], positive
    widths, an even rotary width (the kernel checks the activations' shapes at each call)."""
    dims = [attrs.get(k, 0) for k in ("num_heads", "nope_dim", "v_dim", "latent_dim", "rope_dim")]
    nh, dn, dv, r, d = (int(x) for x in dims)
    return (min(nh, dn, dv, r, d) > 0 and d % 2 == 0 and "scale" in attrs
            and tuple(shape) == (nh * (dn + dv), r))  # fmt: skip

