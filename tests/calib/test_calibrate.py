"""`nextn calibrate` end to end on the tiny artifact: each scheme, the report, the refusal, bad data."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

import nextn
from nextn.calib.calibrate import REPORT, CalibOptions, calibrate_artifact, round_to_bf16
from nextn.errors import NextnError
from nextn.export.manifest import read_manifest

FAST = dict(samples=6, seq_len=24, eval_samples=2, min_top1=0.0)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Text in the tiny tokenizer's words (w0 .. w255), one prompt per line."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("\n".join(" ".join(f"w{t}" for t in rng.integers(2, 256, 24)) for _ in range(10)) + "\n")
    return path


@pytest.fixture(scope="module", params=["int8", "fp8", "int4"])
def calibrated(request, tiny_artifact, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / request.param
    manifest = calibrate_artifact(tiny_artifact, out, [data_file], [], CalibOptions(scheme=request.param, **FAST))
    return request.param, out, manifest


def test_artifact_loads_runs_and_its_scales_are_finite_and_used(calibrated, tiny_artifact):
    scheme, out, manifest = calibrated
    assert read_manifest(out, verify=True)["quantization"]["graphs"]["trunk"]["scheme"] == scheme
    for name, g in manifest["graphs"].items():
        model = onnx.load(str(out / g["file"]))  # weights read from weights.bin
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        ops = [n.op_type for n in model.graph.node]
        quant_nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMulNBits")]
        assert quant_nodes, f"{name}: nothing quantized"
        for n in quant_nodes:  # each node's scale is a finite, positive initializer
            scale = inits[n.input[2] if n.op_type == "MatMulNBits" else n.input[1]].astype(np.float32)
            assert np.isfinite(scale).all() and (scale > 0).all(), (name, n.name)
        if scheme == "int4":
            assert "MatMulNBits" in ops and "QuantizeLinear" not in ops
        else:
            assert ops.count("QuantizeLinear") > 0
            dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
            assert all(any(d.output[0] in m.input for m in model.graph.node) for d in dq)  # every DQ feeds a node
    with nextn.load(out) as model:  # runs, drafting included, under the runtime as any artifact
        r = model.generate([5, 6, 7, 8], max_new_tokens=12, draft=2)
        assert len(r.token_ids) == 12
        plain = model.generate([5, 6, 7, 8], max_new_tokens=12, draft=0)
        assert plain.token_ids == r.token_ids  # lossless against its own trunk


def test_the_quantization_changes_outputs_but_stays_close(calibrated):
    scheme, out, manifest = calibrated
    t = manifest["quantization"]["report"]["trunk"]
    # > 0: the quantized graphs really differ from fp32; small: they compute the same function. A random
    # model's near-uniform logits make top-1 agreement a coin flip, so it is not asserted here; 4-bit
    # blocks of tiny random weights cost KL ~0.1 (int8, fp8: ~0.01).
    assert 0 < t["kl_mean"] < {"int8": 0.05, "fp8": 0.05, "int4": 0.3}[scheme], t


def test_report_fields(calibrated):
    scheme, out, manifest = calibrated
    rep = json.loads((out / REPORT).read_text())
    assert rep == manifest["quantization"]["report"]
    assert rep["scheme"] == {"trunk": scheme, "mtp": scheme}
    assert set(rep["trunk"]) >= {"top1_agreement", "kl_mean", "perplexity_fp32", "perplexity", "positions"}
    d = rep["decoding"]
    for who in ("fp32", "quantized"):
        assert set(d[who]) == {"K=0", "K=2"}
        assert len(d[who]["K=2"]["accepted_per_position"]) == 2
        assert d[who]["K=0"]["tokens_per_s"] > 0
    assert rep["size"]["bytes"] < rep["size"]["fp32_bytes"]
    assert rep["calibration"]["sequences"] == 6 and rep["evaluation"]["sequences"] == 2
    assert rep["passed"] is True


def test_attention_weights_are_rounded_to_bf16_values(calibrated, tiny_artifact):
    # kv_b_proj is no linear a scheme quantizes; a quantized artifact keeps it as bf16 values, which the runtime's
    # attention kernel reads in half the bytes (the tiny checkpoint is fp32, so every one changes)
    scheme, out, manifest = calibrated
    layers = 0
    for g in manifest["graphs"].values():
        source, quantized = (onnx.load(str(root / g["file"])) for root in (tiny_artifact, out))
        before = {t.name: onnx.numpy_helper.to_array(t) for t in source.graph.initializer}
        after = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
        for node in (n for n in source.graph.node if n.op_type == "MlaAttention"):
            w = node.input[-1]
            assert after[w].dtype == np.float32 and not np.array_equal(after[w], before[w])
            assert np.array_equal(after[w], round_to_bf16(before[w])), w
            layers += 1
    assert layers and manifest["quantization"]["report"]["attention_bf16"] == layers


def test_round_to_bf16_is_round_to_nearest_even():
    import torch

    rng = np.random.default_rng(4)
    w = np.concatenate([rng.standard_normal(1000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 1000),
                        np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 0.0, -0.0], np.float32)])  # fmt: skip
    want = torch.from_numpy(w).to(torch.bfloat16).float().numpy()  # torch rounds to nearest, ties to even
    assert np.array_equal(round_to_bf16(w), want)
    assert round_to_bf16(np.float32([1 + 2**-8]))[0] == 1.0  # a tie: to the even bf16 (1.0, not 1 + 2^-7)


def test_mtp_graphs_may_keep_fp32(tiny_artifact, data_file, tmp_path):
    m = calibrate_artifact(tiny_artifact, tmp_path / "q", [data_file], [],
                           CalibOptions(scheme="int4", mtp_scheme="fp32", weight_method="rtn", **FAST))  # fmt: skip
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "mtp_0.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" not in ops and "QMoE" not in ops and "MoE" in ops
    assert m["quantization"]["report"]["scheme"] == {"trunk": "int4", "mtp": "fp32"}
    trunk_ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "trunk.onnx"), load_external_data=False).graph.node}
    assert "QMoE" in trunk_ops and "MoE" not in trunk_ops  # the trunk's fused experts are quantized
    assert m["quantization"]["report"]["kept_float"] == []  # fp32 by choice is not "kept float"


def test_experts_take_the_largest_block_that_fits(tiny_artifact, data_file, tmp_path):
    # tiny: hidden 64, experts 32 wide. --block-size 64 fits the linears but not the experts' fc2, which
    # take 32 instead of staying float (QMoE has no padded last block).
    m = calibrate_artifact(tiny_artifact, tmp_path / "q", [data_file], [],
                           CalibOptions(scheme="int4", weight_method="rtn", block_size=64, **FAST))  # fmt: skip
    q = m["quantization"]
    assert q["graphs"]["trunk"]["experts"]["block_sizes"] == [32] and q["report"]["kept_float"] == []
    qmoe = [n for n in onnx.load(str(tmp_path / "q" / "trunk.onnx"), load_external_data=False).graph.node
            if n.op_type == "QMoE"]  # fmt: skip
    assert qmoe and all(onnx.helper.get_attribute_value(a) == 32 for n in qmoe for a in n.attribute
                        if a.name == "block_size")  # fmt: skip


def test_expert_block_size_choice():
    from nextn.calib.calibrate import BLOCK_SIZES
    from nextn.calib.experts import expert_block_size
    from nextn.calib.rewrite import Experts

    def ex(h, i):
        return Experts("moe", "x", "p", "w13", "w2", 8, h, i)

    assert expert_block_size(ex(1024, 256), 128, BLOCK_SIZES) == 128
    assert expert_block_size(ex(256, 96), 128, BLOCK_SIZES) == 32  # the embedded model's experts
    assert expert_block_size(ex(256, 96), 16, BLOCK_SIZES) == 16
    assert expert_block_size(ex(24, 24), 128, BLOCK_SIZES) is None


def test_refuses_under_the_threshold_and_writes_nothing(tiny_artifact, data_file, tmp_path):
    opts = CalibOptions(scheme="int4", weight_method="rtn", **{**FAST, "min_top1": 1.0})
    with pytest.raises(NextnError, match=r"top-1 agreement 0\.\d+ is under --min-top1 1"):
        calibrate_artifact(tiny_artifact, tmp_path / "q", [data_file], [], opts)
    assert list(tmp_path.iterdir()) == []  # no artifact, no temporary folder


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("empty.txt", "\n\n", "no sequence of 2 or more tokens"),
        ("ids.ids", "3 4 999\n", "token id 999 is outside the model's vocabulary"),
        ("bad.ids", "3 x 4\n", "expected token ids"),
        ("bad.jsonl", '{"foo": 1}\n', 'expected {"text"'),
        ("neg.jsonl", '{"token_ids": [1, -2, 3]}\n', "token id -2 is outside"),
    ],
)
def test_bad_calibration_data_is_a_clear_error(tiny_artifact, tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(NextnError, match=match) as e:
        calibrate_artifact(tiny_artifact, tmp_path / "q", [path], [], CalibOptions(**FAST))
    assert str(path) in str(e.value)
    assert not (tmp_path / "q").exists()


def test_an_already_quantized_artifact_or_torch_backend_is_refused(calibrated, data_file, tmp_path):
    scheme, out, _ = calibrated
    with pytest.raises(NextnError, match="already quantized"):
        calibrate_artifact(out, tmp_path / "again", [data_file], [], CalibOptions(**FAST))
    with pytest.raises(NextnError, match="--backend torch: .* quantized"):
        nextn.load(out, backend="torch")


def test_cli_calibrate_inspect_and_bad_input(tiny_artifact, data_file, tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "nextn.cli"]
    r = subprocess.run([*cmd, "calibrate", str(tiny_artifact), "--data", str(data_file), "--scheme", "int8",
                        "--samples", "4", "--seq-len", "16", "--eval-samples", "2", "--min-top1", "0", "-o", str(out)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "top-1 agreement" in r.stdout and f"wrote {out}" in r.stdout
    r = subprocess.run([*cmd, "inspect", str(out)], capture_output=True, text=True)
    assert "quantized   trunk int8 Q/DQ (minmax" in r.stdout, r.stdout
    bad = tmp_path / "bad.ids"
    bad.write_text("1 2 100000\n")
    r = subprocess.run([*cmd, "calibrate", str(tiny_artifact), "--data", str(bad), "-o", str(tmp_path / "x")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "100000" in r.stderr and str(bad) in r.stderr


def test_fp8_needs_opset_19(tiny_artifact, data_file, tmp_path):
    art = tmp_path / "op18"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    m["opset"] = 18
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(NextnError, match="--scheme fp8: float8 Q/DQ needs opset >= 19"):
        calibrate_artifact(art, tmp_path / "q", [data_file], [], CalibOptions(scheme="fp8", **FAST))


def test_output_may_not_be_or_hold_the_artifact(tiny_artifact, data_file, tmp_path):
    art = tmp_path / "models" / "fp32"
    shutil.copytree(tiny_artifact, art)
    for out in (art, art / "int4", tmp_path / "models"):
        with pytest.raises(NextnError, match="is, holds or lies inside the artifact"):
            calibrate_artifact(art, out, [data_file], [], CalibOptions(force=True, **FAST))
    assert read_manifest(art, verify=True)  # untouched


def test_a_few_sequences_still_hold_one_out(tmp_path):
    from nextn.calib.data import calibration_and_eval

    path = tmp_path / "d.ids"
    path.write_text("1 2 3\n4 5 6\n7 8 9\n")
    cal, ev = calibration_and_eval([path], [], None, 256, 32, 16, 8)
    assert cal.ids == [[1, 2, 3], [4, 5, 6]] and ev.ids == [[7, 8, 9]]
    assert "not calibrated on" in ev.source


def test_exact_trunk_with_quantized_drafts(tiny_artifact, data_file, tmp_path):
    """--scheme fp32 --mtp-scheme int4: the trunk graph and its weights stay as exported, so greedy output
    equals the fp32 artifact's at every K; only the MTP graphs are quantized (cheaper drafts)."""
    out = tmp_path / "fp32-int4"
    manifest = calibrate_artifact(tiny_artifact, out, [data_file], [],
                                  CalibOptions(scheme="fp32", mtp_scheme="int4", **FAST))  # fmt: skip
    rep = manifest["quantization"]["report"]
    assert rep["scheme"] == {"trunk": "fp32", "mtp": "int4"} and rep["trunk"]["top1_agreement"] == 1.0
    trunk = [n.op_type for n in onnx.load(str(out / "trunk.onnx"), load_external_data=False).graph.node]
    source = [n.op_type for n in onnx.load(str(tiny_artifact / "trunk.onnx"), load_external_data=False).graph.node]
    assert trunk == source
    assert "MatMulNBits" in [n.op_type for n in onnx.load(str(out / "mtp_0.onnx"), load_external_data=False).graph.node]
    with nextn.load(tiny_artifact) as fp32, nextn.load(out) as mixed:
        fp32.eos_ids = mixed.eos_ids = ()
        want = fp32.generate([5, 6, 7, 8], max_new_tokens=16, draft=0).token_ids
        for k in (0, 2, 3, "auto"):
            assert mixed.generate([5, 6, 7, 8], max_new_tokens=16, draft=k).token_ids == want
    with pytest.raises(NextnError, match="--mtp-scheme"):
        calibrate_artifact(tiny_artifact, tmp_path / "x", [data_file], [], CalibOptions(scheme="fp32", **FAST))


@pytest.mark.parametrize("opts", [dict(scheme="int4", weight_method="rtn"),
                                  dict(scheme="fp32", mtp_scheme="int4", weight_method="gptq"),
                                  dict(scheme="int8")])  # fmt: skip
def test_streamed_rewrite_equals_loading_every_tensor(tiny_artifact, data_file, tmp_path, opts):
    """Every scheme rewrites a tensor at a time (calib/streaming.py): the same weights.bin and graphs as
    loading the graph's tensors whole."""
    o = CalibOptions(**opts, **FAST, decode_report=False)
    calibrate_artifact(tiny_artifact, tmp_path / "streamed", [data_file], [], o)
    calibrate_artifact(tiny_artifact, tmp_path / "loaded", [data_file], [], o, in_memory=True)
    assert (tmp_path / "streamed" / "weights.bin").read_bytes() == (tmp_path / "loaded" / "weights.bin").read_bytes()
    for g in ("trunk.onnx", "mtp_0.onnx", "mtp_1.onnx"):
        a, b = (onnx.load(str(tmp_path / d / g), load_external_data=False) for d in ("streamed", "loaded"))
        assert a.SerializeToString() == b.SerializeToString(), g


def test_streamed_rewrite_reads_one_tensor_at_a_time(tiny_artifact, data_file, tmp_path, monkeypatch):
    """The streamed rewrite never loads a graph's tensors: each weight is read by itself, once."""
    from nextn.calib import streaming

    real_load, reads, readers = onnx.load, [], []
    real_raw = streaming.TensorReader.raw

    def load(path, load_external_data=True, **kw):
        assert not load_external_data, path
        return real_load(path, load_external_data=load_external_data, **kw)

    def raw(self, t):  # one reader per graph
        readers.append(self)
        reads.append((id(self), t.name))
        return real_raw(self, t)

    monkeypatch.setattr(onnx, "load", load)
    monkeypatch.setattr(streaming.TensorReader, "raw", raw)
    calibrate_artifact(tiny_artifact, tmp_path / "q", [data_file], [],
                       CalibOptions(scheme="int4", weight_method="rtn", **FAST, decode_report=False))  # fmt: skip
    assert reads and len(reads) == len(set(reads))
