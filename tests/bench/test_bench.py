"""nextn bench: the summaries are computed exactly, the JSON/table/plot come out, a tiny run finishes.
No timing assertions: figures are whatever this machine gives."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from nextn.bench.latency import batch_of, load_prompts, percentiles, summarize
from nextn.bench.sweep import SIZES, _auto_cell, decode_read_bytes, project
from nextn.cli import cli
from nextn.errors import NextnError
from nextn.export.manifest import FORMAT_VERSION


def _stats(step_ms, step_tokens, drafted_pp, accepted_rate_pp, total=100.0, ttft=10.0):
    return {"step_ms": step_ms, "step_tokens": step_tokens, "steps": len(step_ms), "accepted": sum(step_tokens) - len(step_ms),
            "drafted_per_position": drafted_pp, "accepted_per_position": accepted_rate_pp, "ttft_ms": ttft,
            "tpot_ms": (total - ttft) / (sum(step_tokens)), "new_tokens": sum(step_tokens) + 1,
            "time_ms": {"total": total, "host": 5.0}}  # fmt: skip


def test_summarize_counts_tokens_and_acceptance_exactly():
    # two steps of K=2: the first accepted both drafts (3 tokens in 6 ms), the second none (1 token in 4 ms)
    s = _stats([6.0, 4.0], [3, 1], [2, 2], [0.5, 0.5])
    out = summarize([[s]], draft=2)
    assert out["token_latency_ms"]["n"] == 4
    assert out["token_latency_ms"]["median"] == pytest.approx(2.0)  # samples 2, 2, 2, 4
    assert out["token_latency_ms"]["p99"] == pytest.approx(np.percentile([2, 2, 2, 4], 99))
    assert out["mean_acceptance_length"] == pytest.approx(2.0)  # 4 tokens / 2 steps
    assert out["accepted_per_position"] == [0.5, 0.5] and out["drafted_per_position"] == [2, 2]
    assert out["tokens_per_s"]["median"] == pytest.approx(5 / 0.1)
    assert out["host_fraction"] == pytest.approx(0.05)


def test_percentiles_and_batches():
    assert percentiles([]) == {"median": None, "p90": None, "p99": None, "mean": None, "n": 0}
    assert percentiles([1, 2, 3])["median"] == 2
    assert batch_of([[1], [2], [3]], 1, 2) == [[3], [1]]  # run 1 of batch 2 wraps around


def test_projection_formula():
    costs = {"verify_cost": {1: 1.1, 2: 1.2}, "mtp_cost": 0.1}
    assert project(costs, {1: 1.8, 2: 2.4}) == pytest.approx({1: 1.8 / 1.2, 2: 2.4 / 1.4})


def test_decode_read_bytes_counts_only_the_chosen_experts():
    cfg = SIZES["tiny"]()
    from nextn.model.weights import trunk_shapes

    shapes = trunk_shapes(cfg)
    expert = sum(np.prod(s) for n, s in shapes.items() if ".mlp.experts." in n)
    dense = sum(np.prod(s) for n, s in shapes.items() if ".mlp.experts." not in n and "embed_tokens" not in n)
    want = 4 * (dense + expert * cfg.num_experts_per_tok / cfg.n_routed_experts + cfg.hidden_size)
    assert decode_read_bytes(cfg) == int(want)


def test_prompt_files(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"token_ids": [5, 6, 7, 8, 9]}\n\n{"token_ids": [3]}\n')
    assert load_prompts(tmp_path / "p.jsonl", None, 256, 4, 2) == [[5, 6, 7, 8], [3]]
    (tmp_path / "bad.jsonl").write_text('{"token_ids": [300]}\n')
    with pytest.raises(NextnError, match="outside"):
        load_prompts(tmp_path / "bad.jsonl", None, 256, 4, 2)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(NextnError, match="no sequence of 1 or more tokens"):
        load_prompts(tmp_path / "empty.txt", None, 256, 4, 2)
    (tmp_path / "x.txt").write_text("hello\n")
    with pytest.raises(NextnError, match="tokenizer"):
        load_prompts(tmp_path / "x.txt", None, 256, 4, 2)


def test_projected_speedup_counts_each_steps_cost_and_tokens():
    from nextn.bench.run import projected_speedup
    from nextn.runtime.costs import BatchCosts

    costs = BatchCosts(2.0, [1.0, 1.5, 2.0], [], 0.0, 0.0)  # ms: 2, 3, 4 per step at K = 0, 1, 2
    # one run, batch 1: steps at K = 2 (3 tokens), K = 1 (1 token), K = 0 (1 token): 5 tokens in 9 ms
    run = [{"step_draft": [2, 1, 0], "step_tokens": [3, 1, 1]}]
    assert projected_speedup([run], costs, 1) == pytest.approx(5 / 9 * 2.0)
    # batch 2: a step's cost is that of its widest row; a finished row adds no step
    rows = [{"step_draft": [2, 1], "step_tokens": [3, 2]}, {"step_draft": [0], "step_tokens": [1]}]
    assert projected_speedup([rows], costs, 2) == pytest.approx(6 / 7 * 2.0 / 2)


def test_speedup_pairs_rounds():
    """The speedup over K = 0 is the median of per-round ratios, not a ratio of medians (drift cancels)."""
    from nextn.bench.run import _speedups

    def row(k, tpots):
        return {"backend": "ort", "batch": 1, "draft": k, "runs": [[{"tpot_ms": t}] for t in tpots]}

    results = [row(0, [1.0, 2.0, 4.0]), row(1, [0.5, 4.0, 2.0])]
    _speedups(results)
    assert results[1]["speedup_vs_k0"] == pytest.approx(2.0) and results[1]["speedup_range"] == [0.5, 2.0]
    assert results[0]["speedup_vs_k0"] == pytest.approx(1.0)


def test_bench_cli_writes_json_table_and_plot(tiny_artifact, tmp_path):
    out, plot = tmp_path / "b.json", tmp_path / "b.png"
    r = CliRunner().invoke(cli, ["bench", str(tiny_artifact), "--draft", "0,1,2,auto", "--batch", "1,2", "--repeats",
                                 "2", "--gen-len", "6", "--prompt-len", "5", "--json", str(out), "--plot", str(plot)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "TPOT ms" in r.output and "faster than transformers generate" in r.output and "K=auto" in r.output
    doc = json.loads(out.read_text())
    assert {"cpu", "cores", "threads_used", "versions"} <= doc["machine"].keys()
    assert doc["machine"]["versions"]["onnxruntime"]
    rows = {(x["backend"], x["batch"], x["draft"]) for x in doc["results"]}
    assert {("ort", b, k) for b in (1, 2) for k in (0, 1, 2, "auto")} <= rows
    assert ("transformers", 1, 0) in rows and ("transformers+mtp", 1, 2) in rows
    for x in doc["results"]:
        assert len(x["runs"]) == 2
        for key in ("ttft_ms", "tpot_ms", "token_latency_ms", "tokens_per_s"):
            assert {"median", "p90", "p99"} <= x[key].keys() and x[key]["median"] > 0
        if x["backend"] == "ort":
            positions = 4 if x["draft"] == "auto" else x["draft"]  # auto: up to 2 modules + 2 recursions
            assert x["speedup_vs_k0"] > 0 and len(x["accepted_per_position"]) == positions
            assert all(sum(s["new_tokens"] for s in run) == 6 * x["batch"] for run in x["runs"])  # EOS ignored
            assert x["projected_speedup"] > 0 and x["efficiency"] == pytest.approx(x["speedup_vs_k0"] / x["projected_speedup"])
            if x["draft"] == 0:
                assert x["projected_speedup"] == pytest.approx(1.0)
            if x["draft"] == "auto":
                assert sum(x["draft_histogram"].values()) == sum(len(run[0]["step_draft"]) for run in x["runs"])
    assert len(doc["step_costs"]["ort, batch 1"]["ratio_to_K0"]) == 5
    ratio = next(q for q in doc["ratios"] if q["backend"] == "ort" and q["batch"] == 1)
    assert ratio["vs_transformers"] > 0 and ratio["vs_transformers_mtp"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_bad_flags(tiny_artifact):
    r = CliRunner().invoke(cli, ["bench", str(tiny_artifact), "--draft", "0,x"])
    assert r.exit_code == 1 and "--draft" in r.output
    r = CliRunner().invoke(cli, ["bench", str(tiny_artifact), "--backend", "tensorrt"])
    assert r.exit_code == 1 and "--backend 'tensorrt'" in r.output
    r = CliRunner().invoke(cli, ["bench", str(tiny_artifact), "--quant", "int4"])
    assert r.exit_code == 1 and "--quant: only with --sweep" in r.output
    r = CliRunner().invoke(cli, ["bench", str(tiny_artifact), "--threads", "-1"])  # torch took it and raised
    assert r.exit_code == 1 and "--threads -1: must be >= 0" in r.output and "Traceback" not in r.output


def test_bench_at_the_backends_default_threads(tiny_artifact):
    # --threads 0 is the backends' default, as for `nextn run` (torch.set_num_threads(0) raised a traceback)
    r = CliRunner().invoke(cli, ["bench", str(tiny_artifact), "--draft", "0", "--repeats", "1", "--gen-len", "4",
                                 "--prompt-len", "4", "--baseline", "none", "--threads", "0"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "the backends' default threads" in r.output


def test_sweep_auto_cell_shows_the_error_of_the_mean():
    alternating = {"auto_vs_k0": 0.987, "stderr": math.log(1.02), "range": [0.85, 1.14]}
    assert _auto_cell(alternating) == "0.99x +-2% (0.85-1.14)"
    assert _auto_cell({"auto_vs_k0": 0.899, "range": [0.87, 1.14]}) == "0.90x (0.87-1.14)"  # an older JSON: a median


@pytest.mark.slow
def test_sweep_tiny(tiny_artifact, tmp_path):
    out = tmp_path / "s.json"
    r = CliRunner().invoke(cli, ["bench", str(tiny_artifact), "--sweep", "tiny", "--sweep-dir", str(tmp_path / "sw"),
                                 "--draft", "0,1,2", "--quant", "int4,int8", "--json", str(out),
                                 "--plot", str(tmp_path / "s.png")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "int4 TPOT (x fp32)" in r.output
    doc = json.loads(out.read_text())
    emb, tiny = doc["rows"]
    assert emb["size"] == "embedded" and set(emb["measured_speedup"]) == {"1", "2"}
    auto = tiny["auto"]  # alternating rounds: a geometric mean within their range, and its standard error
    assert auto["rounds"] == 12 and auto["range"][0] <= auto["auto_vs_k0"] <= auto["range"][1] and auto["stderr"] >= 0
    assert "0" in auto["draft_histogram"]
    assert tiny["size"] == "tiny" and tiny["vs_floor"] > 0 and set(tiny["verify_cost"]) == {"1", "2"}
    assert doc["copy_bandwidth_gb_s"] > 0
    q = tiny["quantized"]
    assert set(q) == {"fp32", "int4", "int8"} and q["fp32"]["speedup"] == 1.0
    assert all(v["tpot_ms"] > 0 for v in q.values())
    assert q["int4"]["weights_bytes"] < q["fp32"]["weights_bytes"]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_requantizes_when_its_export_changed(tmp_path, monkeypatch):
    """A cached quantized sweep artifact is reused only when it was made from the current fp32 export."""
    import nextn.calib.calibrate as calibrate
    from nextn.bench.sweep import prepare_quantized

    def artifact(path, meta):
        path.mkdir()
        (path / "weights.bin").write_bytes(b"w")
        files = {"weights.bin": {"bytes": 1, "sha256": "x"}}
        (path / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files, **meta}))

    fp32, quant = tmp_path / "tiny-onnx", tmp_path / "tiny-int4"
    artifact(fp32, {})
    artifact(quant, {"quantization": {"source_weights_sha256": "x"}})
    calls = []
    monkeypatch.setattr(calibrate, "calibrate_artifact", lambda *a, **k: calls.append(a))
    assert prepare_quantized("tiny", "int4", fp32, tmp_path) == quant and calls == []
    m = json.loads((fp32 / "manifest.json").read_text())
    m["files"]["weights.bin"]["sha256"] = "y"  # the export was rebuilt
    (fp32 / "manifest.json").write_text(json.dumps(m))
    prepare_quantized("tiny", "int4", fp32, tmp_path)
    assert len(calls) == 1


def test_sweep_reexports_an_older_versions_artifact(tmp_path, monkeypatch):
    """A sweep export is reused only when this nextn version wrote it (newer versions change graph forms)."""
    import nextn
    import nextn.export.exporter as exporter
    from nextn.bench.sweep import prepare

    art = tmp_path / "tiny-onnx"
    art.mkdir()
    (tmp_path / "tiny-ckpt").mkdir()
    (tmp_path / "tiny-ckpt" / "config.json").write_text("{}")  # present: prepare does not write a checkpoint
    calls = []
    monkeypatch.setattr(exporter, "export_checkpoint", lambda *a, **k: calls.append(a))
    for version, exported in ((nextn.__version__, 0), ("0.1.0", 1)):
        (art / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "files": {}, "tools": {"nextn": version}}))
        assert prepare("tiny", tmp_path) == art
        assert len(calls) == exported
