"""The memory floor of a decode step: weight bytes one token reads, over the machine's read bandwidth.

Bytes are counted from an artifact's trunk graph as it is stored (fp32, Q/DQ int8, MatMulNBits, QMoE...),
not from the config, so every quantized form counts its own scales and zero points:

    every initializer a node reads                    all of it
    routed experts (MoE / QMoE weight inputs)         top_k / n_routed_experts of it (one token's share)
    the embedding (Gather / GatherBlockQuantized)     one row
    fp32 weights whose values are all bf16 ones,      half of it: nextn's kernels read them as bf16
    read by MatMul (not a router's), MoE or the       (runtime/bf16_matmul.py, routed_experts.py,
    attention (a bf16 checkpoint; a quantized         latent_attention.py; without a C compiler they
    artifact's kv_b_proj)                             read fp32)

A decode step also reads its KV cache and activations; at the contexts measured here (64 + 64 tokens)
that is under 1% of the weights, so it is left out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# bits per element by ONNX TensorProto data type (float, uint8, int8, int16, int32, int64, bool, float16,
# double, bfloat16, the float8s, uint4, int4)
_BITS = {1: 32, 2: 8, 3: 8, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4}
_EXPERT_OPS = ("MoE", "QMoE")
_GATHER_OPS = ("Gather", "GatherBlockQuantized")


@dataclass(frozen=True)
class ReadBytes:
    total: int  # bytes one single-token trunk step reads
    by_op: dict[str, int]  # the same, by the op type that reads them


def trunk_read_bytes(artifact: str | Path) -> ReadBytes:
    """Weight bytes one single-token step of `artifact`'s trunk reads (the module docstring's rules)."""
    import onnx

    from nextn.export.manifest import read_manifest

    root = Path(artifact)
    manifest = read_manifest(root, verify=False)
    cfg = manifest["config"]
    expert_share = cfg["num_experts_per_tok"] / cfg["n_routed_experts"] if cfg.get("n_routed_experts") else 1.0
    model = onnx.load(str(root / manifest["graphs"]["trunk"]["file"]), load_external_data=False)
    size = {t.name: -(-int(np.prod(t.dims, dtype=np.int64)) * _BITS.get(t.data_type, 32) // 8)
            for t in model.graph.initializer}  # fmt: skip
    halved = _read_as_bf16(model, root)
    by_op: dict[str, float] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name not in size:
                continue
            n = float(size[name]) / (2 if name in halved else 1)
            if node.op_type in _EXPERT_OPS and i >= 2:  # inputs 0, 1: activations and router probabilities
                n *= expert_share
            elif node.op_type in _GATHER_OPS and i == 0:  # a table read one row per token
                n /= cfg["vocab_size"]
            by_op[node.op_type] = by_op.get(node.op_type, 0.0) + n
    return ReadBytes(int(sum(by_op.values())), {k: int(v) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])})


def _read_as_bf16(model, root: Path) -> set[str]:
    """The fp32 initializers nextn's kernels read as bf16: every value a bf16 one, read by a MatMul that is not
    a router's, a MoE (its two stacks) or the attention (kv_b_proj)."""
    import onnx

    from nextn.calib.rewrite import is_router_product, node_readers
    from nextn.calib.streaming import TensorReader
    from nextn.runtime.routed_experts import is_bf16

    inits = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    readers = node_readers(model)
    wanted = set()
    for node in model.graph.node:
        if node.op_type == "MatMul" and not is_router_product(node, readers):
            wanted.add(node.input[1])
        elif node.op_type == "MoE" and len(node.input) > 4:
            wanted.update((node.input[2], node.input[4]))
        elif node.op_type == "MlaAttention" and len(node.input) == 9:
            wanted.add(node.input[8])
    read = TensorReader(root)
    try:
        return {name for name in wanted if name in inits and is_bf16(read(inits[name]))}
    finally:
        read.close()


def read_bandwidth(threads: int, nbytes: int = 2**30, repeats: int = 3) -> float:
    """Best-of-`repeats` bytes/s of reading one array far larger than the caches (a max over it) on `threads`
    threads: the rate a memory-bound decode step can at best stream its weights at."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(nbytes // 4, dtype=torch.float32)
        x.amax()  # touch every page once
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            x.amax()
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return x.nbytes / best
