"""nextn's routed-experts kernel (runtime/routed_experts.py, kernels/routed_experts.c): ONNX Runtime's MoE, computed
by its own CPU code, for any token count, and the same for a token whatever else is in the call."""

import logging
from unittest import mock

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nextn.calib.rewrite import MS_DOMAIN, apply_qmoe, quantize_rtn
from nextn.runtime import native, routed_experts
from nextn.runtime.engines import open_engines

from kernel_sessions import bf16_values, kernel_session, on_kernel  # tests/runtime: shared by the kernels' tests



def _moe_graph(rng, e: int, h: int, i: int, k: int, normalize: int, **extra) -> onnx.ModelProto:
    weights = {"fc1": rng.standard_normal((e, 2 * i, h)).astype(np.float32) * 0.1,  # gate/up rows interleaved
               "fc2": rng.standard_normal((e, h, i)).astype(np.float32) * 0.1}  # fmt: skip
    attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                 normalize_routing_weights=normalize)  # fmt: skip
    attrs.update(extra)
    node = helper.make_node("MoE", ["x", "probs", "fc1", "", "fc2"], ["y"], domain=MS_DOMAIN, name="moe", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, h]),
                      helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, e])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in weights.items()])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])


def _qmoe_graph(rng, e: int, h: int, i: int, k: int, bits: int, block: int, accuracy_level: int = 4):
    """_moe_graph's experts quantized as nextn's calibration does (round to nearest, asymmetric blocks): QMoE."""
    model = _moe_graph(rng, e, h, i, k, 0)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    experts = tuple([quantize_rtn(w.T, block, bits) for w in arrays[name]] for name in ("fc1", "fc2"))
    apply_qmoe(model, {"moe": experts}, accuracy_level=accuracy_level)
    return model


def _on_kernel(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    return on_kernel(model, routed_experts.use_routed_experts)


def _probs(rng, n: int, e: int, k: int, picked: int) -> np.ndarray:
    """Log routing weights at `picked` experts per row, -inf elsewhere (MoEGroupRouter's form)."""
    probs = np.full((n, e), -np.inf, np.float32)
    for r in range(n):
        probs[r, rng.choice(e, picked, replace=False)] = np.log(rng.uniform(0.1, 1, picked))
    return probs


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("e,h,i,k,normalize",
                         [(8, 256, 96, 2, 0), (16, 40, 24, 3, 1), (4, 200, 72, 4, 0), (6, 48, 15, 2, 0),
                          (70, 16, 8, 65, 0), (4, 520, 300, 2, 0)])  # fmt: skip
def test_the_kernel_computes_onnxruntimes_moe(e, h, i, k, normalize):
    # (40, 24), (200, 72): widths that leave columns after the kernel's chunks and its 16-wide loop; 15: an odd
    # expert width, in one part (the others in two, which the threads share); k 65: more picks than the kernel
    # once clamped k to (64); (520, 300): parts large enough to be stored in column blocks, the last narrower
    rng = np.random.default_rng(e + h)
    model = _moe_graph(rng, e, h, i, k, normalize)
    rewritten, stacks = _on_kernel(model)
    assert [(n.domain, n.op_type) for n in rewritten.graph.node] == [(native.DOMAIN, routed_experts.OP_TYPE)]
    block = helper.get_attribute_value(next(a for a in rewritten.graph.node[0].attribute if a.name == "block_cols"))
    assert block == (routed_experts.BLOCK_COLS if h * i * 4 >= routed_experts.BLOCKED_BYTES else 0)
    parts = 2 if i % 2 == 0 else 1
    assert stacks["fc1"].shape == (e, parts, h, 2 * i // parts) and stacks["fc2"].shape == (e, i, h)
    want, got, got2 = kernel_session(model), kernel_session(rewritten), kernel_session(rewritten, threads=2)
    for n in (1, 2, 3, 4, 5, 9):  # token groups of 1-4, and more than one group
        # normalize = 1: more finite entries than k, so the top k of the softmax and its renormalization matter
        feed = {"x": rng.standard_normal((n, h)).astype(np.float32), "probs": _probs(rng, n, e, k, k + normalize)}
        ref, out = want.run(None, feed)[0], got.run(None, feed)[0]
        assert np.abs(out - ref).max() < 1e-5 * np.abs(ref).max(), n
        assert np.array_equal(got2.run(None, feed)[0], out), n  # the threads share the tasks, not the sums


def _as_bf16_values(model: onnx.ModelProto) -> onnx.ModelProto:
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(bf16_values(numpy_helper.to_array(t)), t.name))
    return model


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("e,h,i", [(8, 64, 48), (8, 256, 96), (4, 200, 72), (4, 1040, 300)])
def test_bf16_weights_are_read_as_bf16_and_give_the_same_output(e, h, i):
    # bf16 chunks of 32k columns widen pairs of columns (kernels/routed_experts.c): (256, 96) is the embedded
    # model's, in 96-wide chunks at 1-4 tokens; (200, 72): a pair chunk, then a 16-wide one, then a tail;
    # (1040, 300): parts stored in column blocks
    rng = np.random.default_rng(6)
    model = _as_bf16_values(_moe_graph(rng, e, h, i, 2, 0))
    rewritten, stacks = _on_kernel(model)
    assert rewritten.graph.node[0].op_type == routed_experts.OP_TYPE_BF16
    assert stacks["fc1"].dtype == np.uint16 and stacks["fc1"].shape == (e, 2, h, i) and stacks["fc2"].shape == (e, i, h)
    want, got = kernel_session(model), kernel_session(rewritten)
    for n in (1, 2, 3, 4, 5):
        feed = {"x": rng.standard_normal((n, h)).astype(np.float32), "probs": _probs(rng, n, e, 2, 2)}
        ref = want.run(None, feed)[0]
        assert np.abs(got.run(None, feed)[0] - ref).max() < 1e-5 * np.abs(ref).max(), n
    # one weight that is not a bf16 value: the node stays fp32
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w.flat[0] = np.float32(1.0000001)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[0].name))
    assert _on_kernel(model)[0].graph.node[0].op_type == routed_experts.OP_TYPE


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("form", ["fp32", "bf16", "int4", "int8"])
def test_a_tokens_output_does_not_depend_on_the_other_tokens(form):
    # A verify pass and a one-token step must agree bit for bit on the same token (greedy stays identical).
    rng = np.random.default_rng(3)
    if form.startswith("int"):
        rewritten = on_kernel(_qmoe_graph(rng, 8, 64, 64, 2, int(form[3:]), 32), routed_experts.use_quantized_experts)[0]
    else:
        model = _moe_graph(rng, 8, 64, 48, 2, 0)
        rewritten = _on_kernel(_as_bf16_values(model) if form == "bf16" else model)[0]
    session = kernel_session(rewritten)
    x, probs = rng.standard_normal((7, 64)).astype(np.float32), _probs(rng, 7, 8, 2, 2)
    together = session.run(None, {"x": x, "probs": probs})[0]
    for t in range(7):
        alone = session.run(None, {"x": x[t : t + 1], "probs": probs[t : t + 1]})[0]
        assert np.array_equal(alone[0], together[t]), t


def test_only_moe_nodes_the_kernel_computes_exactly_are_rewritten():
    rng = np.random.default_rng(4)
    for extra in ({"activation_alpha": 1.702}, {"activation_beta": 1.0}, {"swiglu_limit": 7.0}):
        model = _moe_graph(rng, 4, 32, 16, 2, 0, **extra)
        assert _on_kernel(model)[0].graph.node[0].op_type == "MoE", extra
    shared = _moe_graph(rng, 4, 32, 16, 2, 0)  # a stack another node also reads keeps its layout
    shared.graph.node.append(helper.make_node("Identity", ["fc2"], ["fc2_copy"]))
    assert _on_kernel(shared)[0].graph.node[0].op_type == "MoE"


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("e,h,i,k,bits,block",
                         [(8, 64, 48, 2, 4, 16), (4, 128, 128, 2, 4, 64), (6, 64, 64, 3, 8, 32), (4, 208, 80, 4, 4, 16),
                          (4, 112, 96, 2, 8, 16)])  # fmt: skip
def test_quantized_experts_compute_onnxruntimes_qmoe(e, h, i, k, bits, block):
    # (64, 48) at 16: two parts of 24 units that are not whole blocks, so one part; (128, 128) and (64, 64): two
    # parts of whole blocks; (208, 80) and (112, 96) at 16: odd block counts, one part of 80 and two of 48
    rng = np.random.default_rng(e + h + bits)
    model = _qmoe_graph(rng, e, h, i, k, bits, block)
    rewritten, stacks = on_kernel(model, routed_experts.use_quantized_experts)
    node = rewritten.graph.node[0]
    assert (node.domain, node.op_type) == (native.DOMAIN, routed_experts.OP_TYPE_Q)
    assert len(rewritten.graph.initializer) == 2 and len(stacks) == 2  # fc2 and the zero points went into them
    parts = 2 if i % 2 == 0 and (i // 2) % block == 0 else 1
    assert {a.shape[:2] for a in stacks.values()} == {(e, parts)}
    want, got, got2 = kernel_session(model), kernel_session(rewritten), kernel_session(rewritten, threads=2)
    for n in (1, 2, 3, 4, 5, 9, 33):
        feed = {"x": rng.standard_normal((n, h)).astype(np.float32), "probs": _probs(rng, n, e, k, k)}
        ref, out = want.run(None, feed)[0], got.run(None, feed)[0]
        assert np.abs(out - ref).max() < 1e-5 * np.abs(ref).max(), n  # the same int8 rounding, sums in other orders
        assert np.array_equal(got2.run(None, feed)[0], out), n


def test_only_qmoe_nodes_the_kernel_computes_as_onnxruntime_are_rewritten():
    rng = np.random.default_rng(7)
    full_precision = _qmoe_graph(rng, 4, 32, 16, 2, 4, 16, accuracy_level=0)  # fp32 activations: not the kernel's
    assert on_kernel(full_precision, routed_experts.use_quantized_experts)[0].graph.node[0].op_type == "QMoE"
    shared = _qmoe_graph(rng, 4, 32, 16, 2, 4, 16)  # a stack another node also reads keeps its layout
    shared.graph.node.append(helper.make_node("Identity", [shared.graph.node[0].input[5]], ["fc2_copy"]))
    assert on_kernel(shared, routed_experts.use_quantized_experts)[0].graph.node[0].op_type == "QMoE"


def test_without_a_compiler_the_graph_keeps_onnxruntimes_moe(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("NEXTN_CACHE", str(tmp_path / "cache"))
    native.kernel_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert native.kernel_library() is None
        assert "nextn's kernels are not used" in caplog.text and not (tmp_path / "cache" / "kernels").exists()
    finally:
        native.kernel_library.cache_clear()


@pytest.mark.usefixtures("needs_kernel")
def test_the_trunk_on_the_kernels_gives_the_same_logits(tiny_moe_forms):
    """The tiny trunk with its experts and attention on nextn's kernels, and without them (ONNX Runtime's MoE, the
    attention's ONNX function): the same logits (one comparison serves both kernels' rewrites)."""
    from nextn.export import io

    _, artifact = tiny_moe_forms["fused"]
    kernel = open_engines(artifact, prepack=True)
    with mock.patch.object(native, "kernel_library", lambda: None):
        moe = open_engines(artifact, prepack=True)
    cfg = moe.manifest["config"]
    assert kernel["trunk"].routed_experts == cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    assert moe["trunk"].routed_experts == 0
    assert kernel["trunk"].attention_kernels == cfg["num_hidden_layers"] and kernel["mtp_0"].attention_kernels == 1
    assert moe["trunk"].attention_kernels == 0
    rng = np.random.default_rng(5)
    for s in (1, 4):
        past = [(rng.standard_normal((2, 6, cfg["kv_lora_rank"]), dtype=np.float32),
                 rng.standard_normal((2, 6, cfg["qk_rope_head_dim"]), dtype=np.float32))
                for _ in range(cfg["num_hidden_layers"])]  # fmt: skip
        feed = io.trunk_feed(rng.integers(0, cfg["vocab_size"], (2, s)), np.arange(6, 6 + s)[None].repeat(2, 0),
                             np.ones((2, 6 + s), np.int64), past)  # fmt: skip
        want, got = moe["trunk"].run(feed), kernel["trunk"].run(feed)
        for a, b in zip(want, got):
            assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(a).max()))
    kernel.close()
    moe.close()
