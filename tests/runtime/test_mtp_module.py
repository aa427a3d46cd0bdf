"""nextn's MTP-module kernel (runtime/mtp_module.py, kernels/mtp_module.c): an int4 MTP graph as one node that
computes the graph's values, drafting on it lossless, every other graph left as it is."""

import re
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import pytest

import nextn
from nextn.calib.calibrate import CalibOptions, calibrate_artifact
from nextn.calib.rewrite import pack_matmulnbits, quantize_rtn
from nextn.errors import NextnError
from nextn.export import io
from nextn.runtime import mtp_module, native, packed_blocks
from nextn.runtime.engines import open_engines

from kernel_sessions import trunk_feed  # tests/runtime: shared by the kernels' tests

SOURCE = Path(mtp_module.__file__).with_name("kernels") / "mtp_module.c"


@pytest.fixture(scope="module")
def int4_artifact(tiny_artifact, tmp_path_factory):
    """The tiny artifact calibrated to int4 (its MTP graphs: MatMulNBits and QMoE, as the embedded drafts)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("int4")
    data = root / "calib.txt"
    data.write_text("\n".join(" ".join(f"w{t}" for t in rng.integers(2, 256, 24)) for _ in range(10)) + "\n")
    opts = CalibOptions(scheme="int4", samples=6, seq_len=24, eval_samples=2, min_top1=0.0, decode_report=False)
    calibrate_artifact(tiny_artifact, root / "a", [data], [], opts)
    return root / "a"


def _feeds(cfg: dict, rng) -> list[dict]:
    """MTP feeds: one row, catch-up rows with the last wanted or all, a padded batch of two, no past."""
    h, r, d, v = cfg["hidden_size"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["vocab_size"]
    feeds = []
    for b, s, p, rows in [(1, 1, 20, [[0]]), (1, 4, 30, [[3]]), (1, 4, 30, [[0, 1, 2, 3]]), (2, 3, 10, [[2], [1]]),
                          (1, 5, 0, [[0, 1, 2, 3, 4]]), (1, 6, 7, [[0, 1, 2, 3, 4, 5]])]:  # fmt: skip
        mask = np.ones((b, p + s), np.int64)
        if b > 1:
            mask[1, :3] = 0  # the second sequence is padded on the left
        feeds.append(io.mtp_feed(rng.integers(0, v, (b, s)), rng.standard_normal((b, s, h), dtype=np.float32),
                                 np.tile(np.arange(p, p + s), (b, 1)), mask,
                                 rng.standard_normal((b, p, r), dtype=np.float32) * 0.5,
                                 rng.standard_normal((b, p, d), dtype=np.float32) * 0.5,
                                 np.array(rows, np.int64)))  # fmt: skip
    return feeds


def _without_kernel(artifact):
    with mock.patch.object(mtp_module, "use_mtp_module", lambda model, array: None):
        return open_engines(artifact, threads=1, prepack=True)


@pytest.mark.usefixtures("needs_kernel")
def test_int4_mtp_graphs_run_as_one_node_with_the_graphs_values(int4_artifact):
    fused, graph = open_engines(int4_artifact, threads=1, prepack=True), _without_kernel(int4_artifact)
    names = [n for n in fused if n.startswith("mtp_")]
    assert names and all(fused[n].mtp_module and not graph[n].mtp_module for n in names)
    assert not fused["trunk"].mtp_module
    rng = np.random.default_rng(1)
    for feed in _feeds(fused.manifest["config"], rng):
        for n in names:
            got, want = fused[n].run(feed), graph[n].run(feed)
            for name, a, b in zip(io.MTP_OUTPUTS, got, want):
                assert a.shape == b.shape, (n, name)
                # the same 4-bit values and int8 activations as MatMulNBits / QMoE; sums in other orders
                assert np.abs(a - b).max() <= 1e-4 * (np.abs(b).max() + 1e-6), (n, name, feed[io.OUTPUT_ROWS])
            assert (got[0].argmax(-1) == want[0].argmax(-1)).all()


@pytest.mark.usefixtures("needs_kernel")
def test_the_generic_products_match_the_vnni_ones(int4_artifact):
    """The kernel's portable loop (machines without AVX512-VNNI) computes what the VNNI path does."""
    fused = open_engines(int4_artifact, threads=1, prepack=True)
    native.kernel_library.cache_clear()
    try:
        with mock.patch.object(native, "CFLAGS", (*native.CFLAGS, "-mno-avx512vnni")):
            portable = open_engines(int4_artifact, threads=1, prepack=True)
    finally:
        native.kernel_library.cache_clear()
    assert portable["mtp_0"].mtp_module and portable["trunk"].routed_experts
    for feed in _feeds(fused.manifest["config"], np.random.default_rng(2))[:3]:
        for a, b in zip(portable["mtp_0"].run(feed), fused["mtp_0"].run(feed)):
            assert np.abs(a - b).max() <= 1e-5 * (np.abs(b).max() + 1e-6)
    feed = trunk_feed(fused.manifest["config"], np.random.default_rng(3), 3, batch=2)  # the trunk's QRoutedExperts
    for a, b in zip(portable["trunk"].run(feed), fused["trunk"].run(feed)):
        assert np.abs(a - b).max() <= 1e-5 * (np.abs(b).max() + 1e-6)


@pytest.mark.usefixtures("needs_kernel")
def test_drafting_on_the_kernel_is_lossless_at_every_batch(int4_artifact):
    with nextn.load(int4_artifact) as model:
        assert model.engines["mtp_0"].mtp_module
        assert model.engines["trunk"].routed_experts  # the trunk's QMoE on nextn.QRoutedExperts: verify = plain too
        prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
        plain = [out for out, _ in model.decoder.generate_many(prompts, 14, draft=0)]
        for k in (1, 3, "auto"):
            assert [out for out, _ in model.decoder.generate_many(prompts, 14, draft=k)] == plain, k
            assert model.decoder.generate(prompts[0], 14, draft=k)[0] == plain[0], k


@pytest.mark.usefixtures("needs_kernel")
def test_one_call_drafts_what_the_per_call_path_drafts(int4_artifact):
    """NativeDrafter (every draft of a step in one kernel call) against the decoder's own loop over the MTP
    engines (the same kernel behind ONNX Runtime): the same drafts, so the same acceptance at every position."""
    with nextn.load(int4_artifact) as model:
        dec = model.decoder
        assert dec.drafter is not None
        prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
        for k in (1, 2, 3, 4, "auto"):
            runs = []
            for drafter in (dec.drafter, None):
                dec.drafter, kept = drafter, dec.drafter
                runs.append([(out, st.drafted_per_position, st.accepted_per_position)
                             for out, st in dec.generate_many(prompts, 16, draft=k)])  # fmt: skip
                dec.drafter = kept
            assert runs[0] == runs[1], k


@pytest.mark.usefixtures("needs_kernel")
def test_a_reused_state_drafts_deeper_than_its_first_sequence(int4_artifact):
    """A step engine hands a finished sequence's caches to the next one (engine._caches), and with them the
    NativeDrafter's view of them, whose drafts buffer the first sequence's K sized: a deeper K gets a new one."""
    from nextn.runtime.engine import Request, StepEngine

    with nextn.load(int4_artifact) as model:
        dec = model.decoder
        first, deeper = Request([5, 6, 7, 8], 40, 2), Request([9, 10, 11], 16, 10)
        engine = StepEngine(dec, max_batch=1)
        for r in (first, deeper):
            seq = engine.add(r)
            while not seq.finished:
                engine.step()
        assert seq.state is None and len(engine._pool) == 1 and len(engine._pool[0].native.drafts) >= 10
        dec.drafter, kept = None, dec.drafter
        alone = dec.generate(deeper.prompt, 16, draft=10)
        dec.drafter = kept
        assert (seq.final(), seq.stats.accepted_per_position) == (alone[0], alone[1].accepted_per_position)


@pytest.mark.usefixtures("needs_kernel")
def test_the_int4_trunk_on_quantized_experts_gives_qmoes_logits(int4_artifact):
    """The int4 trunk with its QMoE nodes on nextn.QRoutedExperts and on ONNX Runtime: the same logits to fp32
    rounding (routed_experts.use_quantized_experts)."""
    from nextn.runtime import routed_experts

    kernel = open_engines(int4_artifact, prepack=True)
    with mock.patch.object(routed_experts, "use_quantized_experts", lambda model, array: {}):
        qmoe = open_engines(int4_artifact, prepack=True)
    cfg = qmoe.manifest["config"]
    assert kernel["trunk"].routed_experts == cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    assert any(n.op_type == "QMoE" for n in onnx.load(str(int4_artifact / "trunk.onnx"), load_external_data=False).graph.node)
    rng = np.random.default_rng(8)
    for s in (1, 4, 9):
        feed = trunk_feed(cfg, rng, s, batch=2)
        for a, b in zip(qmoe["trunk"].run(feed), kernel["trunk"].run(feed)):
            assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max())), s
    kernel.close()
    qmoe.close()


def test_a_draft_past_the_context_is_an_error(int4_artifact):
    from nextn.runtime.decoder import _State

    with nextn.load(int4_artifact) as model:
        dec = model.decoder
        st = _State(dec, max_len=8)
        st.n, st.tokens = 6, [5] * 7
        with pytest.raises(NextnError, match="could not draft 4 tokens at position 6 \\(context 8\\)"):
            dec.drafter.draft(st, 4, 256)


@pytest.mark.usefixtures("needs_kernel")
def test_a_row_out_of_range_is_an_error_of_the_run(int4_artifact):
    fused = open_engines(int4_artifact, threads=1, prepack=True)
    feed = _feeds(fused.manifest["config"], np.random.default_rng(3))[1]
    feed[io.OUTPUT_ROWS] = np.array([[4]], np.int64)  # 4 new rows: 0..3
    with pytest.raises(NextnError, match="mtp_0: nextn's kernel refused"):
        fused["mtp_0"].run(feed)
    feed[io.INPUT_IDS] = feed[io.INPUT_IDS] * 0 + fused.manifest["config"]["vocab_size"]  # a token past the vocabulary
    feed[io.OUTPUT_ROWS] = np.array([[3]], np.int64)
    with pytest.raises(NextnError, match="mtp_0: nextn's kernel refused"):
        fused["mtp_0"].run(feed)


def test_a_graph_past_the_size_limit_keeps_its_nodes(int4_artifact):
    """Large modules keep ONNX Runtime's nodes (the packed copy lives in the serialized graph)."""
    with mock.patch.object(mtp_module, "MAX_GRAPH_BYTES", 1000):
        engines = open_engines(int4_artifact, threads=1, prepack=True)
    assert not engines["mtp_0"].mtp_module


def test_other_graphs_keep_their_nodes(tiny_artifact):
    model = onnx.load(str(tiny_artifact / "mtp_0.onnx"), load_external_data=False)
    before = model.SerializeToString()
    arrays = {}  # an fp32 graph is refused before any weight is read (its MTP module has no QMoE)
    assert not mtp_module.use_mtp_module(model, arrays.__getitem__)
    assert model.SerializeToString() == before


def test_packed_matrices_hold_the_calibrated_values():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((96, 40)).astype(np.float32)  # K 96: a last block of 32 rows after one of 64
    bw = quantize_rtn(w, 64)
    b, scales, zp = pack_matmulnbits(bw)
    m = packed_blocks.from_nbits(b, scales, zp, 96, 40, 64)
    np.testing.assert_array_equal(m.dequantize(), bw.dequantize())
    data, floats = packed_blocks.pack_matrix(m)
    tiles, t = 3, packed_blocks.TILE  # 40 columns: 3 tiles of 16, the last 8 zeros
    bytes_ = data.reshape(tiles, 96 // 8, t, 4)
    q = np.zeros((tiles * t, 96), np.uint8)  # read back: column c of tile i at row 8g + j (low) and 8g + 4 + j (high)
    for j in range(4):
        q[:, j::8] = (bytes_[..., j] & 15).transpose(0, 2, 1).reshape(tiles * t, -1)
        q[:, 4 + j :: 8] = (bytes_[..., j] >> 4).transpose(0, 2, 1).reshape(tiles * t, -1)
    np.testing.assert_array_equal(q[:40], m.q)
    assert not q[40:].any()
    f = floats.reshape(tiles, 2, 2, t)  # [tile, block, (scale, zero * scale), column]
    np.testing.assert_array_equal(f[:, :, 0].transpose(0, 2, 1).reshape(-1, 2)[:40], m.scale)
    np.testing.assert_allclose(f[:, :, 1].transpose(0, 2, 1).reshape(-1, 2)[:40], m.zero * m.scale, rtol=1e-7)


def test_meta_layout_is_the_kernels():
    """META_FIELDS, MATRICES and SCALARS have as many entries as the kernel's enums, in which they are read by
    position (a field added on one side only would shift every later one)."""
    src = SOURCE.read_text()

    def enum(first: str, last: str) -> list[str]:
        body = re.search(rf"enum \{{([^}}]*\b{first}\b[^}}]*)\}}", src).group(1)
        names = re.findall(r"\b([A-Z][A-Z0-9_]+)\b", re.sub(r"/\*.*?\*/", "", body, flags=re.S))
        return names[: names.index(last)]

    assert len(enum("META_VERSION", "META_MATRICES")) == len(mtp_module.META_FIELDS)
    assert len(enum("MAT_EH", "MAT_EXPERTS")) == len(mtp_module.MATRICES)
    assert len(enum("SCALAR_EPS", "SCALARS")) == len(mtp_module.SCALARS)
