"""Shared by the tests of the rewrites a pre-packing session applies (test_routed_experts.py,
test_latent_attention.py, test_expert_halves.py, test_bf16_matmul.py, test_int8_matmul.py): a graph rewritten as that session would,
and an ONNX Runtime session for it."""

from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from nextn.runtime import bf16_matmul, int8_matmul, latent_attention, native, nbits_matmul, routed_experts

KERNEL_OPS = {(native.DOMAIN, op) for op in (*routed_experts.OP_TYPES, latent_attention.OP_TYPE,
                                            latent_attention.OP_TYPE_BF16, bf16_matmul.OP_TYPE,
                                            int8_matmul.OP_TYPE, nbits_matmul.OP_TYPE)}  # fmt: skip


def on_kernel(model: onnx.ModelProto, rewrite: Callable) -> tuple[onnx.ModelProto, dict]:
    """A copy of `model` after `rewrite(model, array)` (use_routed_experts, use_latent_attention, halve_experts), its
    initializers laid out anew as the session would get them. -> the copy, the new layouts by name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    stacks = rewrite(out, arrays.__getitem__)
    for t in out.graph.initializer:
        if t.name in stacks:
            t.CopyFrom(numpy_helper.from_array(stacks[t.name], t.name))
    return out, stacks


def kernel_session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    """A CPU session; nextn's library registered where a node runs on one of its kernels."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if any((n.domain, n.op_type) in KERNEL_OPS for n in model.graph.node):
        so.register_custom_ops_library(str(native.kernel_library()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


ROW_SHAPES = ((1,), (2,), (3,), (4,), (5,), (9,), (70,), (2, 3))  # leading dims of x [..., K]; 70: two row groups


def assert_product_matches(model: onnx.ModelProto, rewritten: onnx.ModelProto, k: int, rng, tolerance: float) -> None:
    """A product on nextn's kernel (`rewritten`) against ONNX Runtime's `model`, x [..., k] at every ROW_SHAPES:
    within `tolerance` of the largest reference value, and bit for bit on two threads (they share tasks, not sums)."""
    want, got, got2 = kernel_session(model), kernel_session(rewritten), kernel_session(rewritten, threads=2)
    for shape in ROW_SHAPES:
        x = rng.standard_normal((*shape, k)).astype(np.float32)
        ref, out = want.run(None, {"x": x})[0], got.run(None, {"x": x})[0]
        assert out.shape == ref.shape and np.abs(out - ref).max() <= tolerance * np.abs(ref).max(), shape
        assert np.array_equal(got2.run(None, {"x": x})[0], out), shape


def assert_rows_are_independent(session, k: int, rng) -> None:
    """A row of x [70, k] gives the same bits alone as among the others: a verify pass and a one-token step agree
    on the same token (greedy stays identical)."""
    x = rng.standard_normal((70, k)).astype(np.float32)
    together = session.run(None, {"x": x})[0]
    for r in (0, 3, 5, 64, 69):
        assert np.array_equal(session.run(None, {"x": x[r : r + 1]})[0][0], together[r]), r


def trunk_feed(cfg: dict, rng, s: int, past_len: int = 5, batch: int = 1) -> dict:
    """A trunk feed: `batch` rows of s random new tokens after past_len random cache entries."""
    from nextn.export import io

    past = [(rng.standard_normal((batch, past_len, cfg["kv_lora_rank"]), dtype=np.float32),
             rng.standard_normal((batch, past_len, cfg["qk_rope_head_dim"]), dtype=np.float32))
            for _ in range(cfg["num_hidden_layers"])]  # fmt: skip
    positions = np.arange(past_len, past_len + s)[None].repeat(batch, 0)
    return io.trunk_feed(rng.integers(0, cfg["vocab_size"], (batch, s)), positions,
                         np.ones((batch, past_len + s), np.int64), past)  # fmt: skip


def assert_drafting_is_lossless(artifact, rng) -> None:
    """Greedy tokens at K = 2 equal K = 0's on `artifact`, opened as `nextn run` opens it (pre-packing: kernels on)."""
    from nextn.runtime.api import Model

    model = Model(artifact, prepack=True)
    prompt = [int(t) for t in rng.integers(2, model.engines.manifest["config"]["vocab_size"], 9)]
    plain = model.generate(prompt, max_new_tokens=24, draft=0).token_ids
    assert len(plain) > 1 and model.generate(prompt, max_new_tokens=24, draft=2).token_ids == plain
    model.engines.close()


def bf16_values(w: np.ndarray) -> np.ndarray:
    """fp32 values cut to bf16 ones (low 16 bits zero): a bf16 checkpoint's weights as exported in fp32."""
    return (np.ascontiguousarray(w, np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
