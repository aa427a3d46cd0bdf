"""Sequential GPTQ (calib/sequential.py): each layer's Hessians come from the quantized layers before it,
one layer of the source checkpoint in memory at a time, and the graphs get exactly what it chose."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from nextn.calib import observe, sequential
from nextn.calib.calibrate import CalibOptions, calibrate_artifact
from nextn.calib.rewrite import find_linears, weight_kn
from nextn.errors import NextnError
from nextn.export.manifest import read_manifest
from nextn.runtime.engines import SharedWeights

FAST = dict(samples=6, seq_len=24, eval_samples=2, min_top1=0.0, decode_report=False)


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("ids") / "calib.ids"
    path.write_text("\n".join(" ".join(map(str, rng.integers(2, 256, 24))) for _ in range(8)) + "\n")
    return path


def _probe_hessians(root: Path, names: list[str], sequences, scratch: Path) -> dict[str, np.ndarray]:
    """x^T x of the trunk activations `names`, as ONNX Runtime computes them in the artifact at `root`."""
    cfg = read_manifest(root, verify=False)["config"]
    probe = observe.open_probe("trunk", root / "trunk.onnx", names, SharedWeights(root / "weights.bin"), scratch, 1)
    acc = {n: 0.0 for n in names}

    def visit(graph, arrays):
        for n in names:
            x = arrays[n].reshape(-1, arrays[n].shape[-1]).astype(np.float64)  # [S, K]
            acc[n] = acc[n] + x.T @ x

    observe.drive({"trunk": probe}, cfg, sequences, visit)
    return acc


def test_each_layer_sees_the_quantized_layers_before_it(tiny_artifact, ids_file, tmp_path, monkeypatch):
    """Layer 0's Hessian is the fp32 model's (nothing before it is quantized); layer 1's is the one the
    quantized artifact's own layer 0 feeds it (within ONNX Runtime's int8-activation rounding), far
    from the fp32 model's, which is what one pass over the fp32 graphs would have used."""
    hessians, sequences = {}, []
    real_gptq, real_pass = sequential.gptq, sequential.sequential_pass

    def gptq(w, h, *a, **k):
        hessians[sequential.fingerprint(w)] = h.copy()
        return real_gptq(w, h, *a, **k)

    def run(source, manifest, schemes, seqs, *a, **k):
        sequences.extend(seqs)
        return real_pass(source, manifest, schemes, seqs, *a, **k)

    monkeypatch.setattr(sequential, "gptq", gptq)
    monkeypatch.setattr(sequential, "sequential_pass", run)
    out = tmp_path / "q"
    m = calibrate_artifact(tiny_artifact, out, [ids_file], [], CalibOptions(scheme="int4", **FAST))
    assert m["quantization"]["graphs"]["trunk"]["weights"]["rtn"] == 0

    graph = onnx.load(str(tiny_artifact / "trunk.onnx"))
    lins = find_linears(graph)[0]
    first, second = lins[0], lins[7]  # q_a of layer 0 and of layer 1 (layer 0, dense, has 7 linears)
    assert second.k == first.k and second.x != first.x
    fp32 = _probe_hessians(tiny_artifact, [first.x, second.x], sequences, tmp_path / "p1")
    quant = _probe_hessians(out, [first.x, second.x], sequences, tmp_path / "p2")

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    h0, h1 = (hessians[sequential.fingerprint(weight_kn(graph, lin))] for lin in (first, second))
    assert rel(h0, fp32[first.x]) < 1e-6
    assert rel(h1, quant[second.x]) < 0.2 * rel(h1, fp32[second.x]), (rel(h1, quant[second.x]), rel(h1, fp32[second.x]))


def test_one_layer_in_memory_and_every_weight_used(tiny_artifact, ids_file, tmp_path, monkeypatch):
    """While the pass runs, at most one decoder layer (trunk or MTP) holds real weights; every weight it
    quantized is one a graph asked for, and every int4 linear and expert got GPTQ's choice."""
    from nextn.model import streamed

    loaded, made = [], []
    real_load, real_pass = streamed.load_tensors, sequential.sequential_pass

    def load_tensors(model, *a, **k):
        real_load(model, *a, **k)
        blocks = [*model.model.layers, *model.mtp]
        loaded.append(sum(any(not p.is_meta for n, p in b.named_parameters() if "embed" not in n and "head" not in n)
                          for b in blocks))  # fmt: skip

    def run(*a, **k):
        made.append(real_pass(*a, **k))
        return made[-1]

    monkeypatch.setattr(streamed, "load_tensors", load_tensors)  # what TopLoaded loads every group with
    monkeypatch.setattr(sequential, "sequential_pass", run)
    m = calibrate_artifact(tiny_artifact, tmp_path / "q", [ids_file], [], CalibOptions(scheme="int4", **FAST))
    assert loaded and max(loaded) == 1
    assert made[0].unused() == 0
    for g in m["quantization"]["graphs"].values():
        assert g["weights"]["rtn"] == 0 and g["experts"]["weights"]["rtn"] == 0


def test_gptq_failure_falls_back_to_round_to_nearest(tiny_artifact, ids_file, tmp_path, monkeypatch):
    def singular(*a, **k):
        raise np.linalg.LinAlgError("not positive definite")

    monkeypatch.setattr(sequential, "gptq", singular)
    m = calibrate_artifact(tiny_artifact, tmp_path / "q", [ids_file], [], CalibOptions(scheme="int4", **FAST))
    trunk = m["quantization"]["graphs"]["trunk"]
    assert trunk["weights"] == {"gptq": 0, "rtn": trunk["linears"]}


def test_source_checkpoint_missing_or_changed_is_a_clear_error(tiny_artifact, tiny_checkpoint, ids_file, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(tiny_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    for source, match in ((tmp_path / "gone", "gone is not there; use --weight-method rtn"),
                          (tiny_checkpoint, "weights are not the source checkpoint's")):  # fmt: skip
        manifest["source"] = str(source)
        (art / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(NextnError, match=match):
            calibrate_artifact(art, tmp_path / "q", [ids_file], [], CalibOptions(scheme="int4", **FAST))
        assert not (tmp_path / "q").exists()
    manifest["source"] = str(tmp_path / "gone")  # round-to-nearest needs no checkpoint
    (art / "manifest.json").write_text(json.dumps(manifest))
    calibrate_artifact(art, tmp_path / "q", [ids_file], [], CalibOptions(scheme="int4", weight_method="rtn", **FAST))


def test_layer_pass_ranges_are_the_probes_ranges(tiny_artifact, ids_file, tmp_path):
    """int8 / fp8 activation statistics from the checkpoint a layer at a time (full-sequence prefills) equal
    those of ONNX Runtime probes of the fp32 graphs (decode and verify chunks with real caches): the same
    rows, amax to float rounding, histograms but for values on a bin edge. Every graph linear is found."""
    from nextn.calib import calibrate
    from nextn.calib.calibrate import BLOCK_SIZES

    manifest = read_manifest(tiny_artifact, verify=False)
    schemes = {g: "int8" for g in manifest["graphs"]}
    sequences = [list(map(int, line.split())) for line in ids_file.read_text().split("\n") if line][:4]
    settings = sequential.PassSettings(64, 8, BLOCK_SIZES, histograms=True)
    layered = sequential.sequential_pass(Path(manifest["source"]), manifest, schemes, sequences, settings, tmp_path / "p")
    graphs = {g: onnx.load(str(tiny_artifact / m["file"])) for g, m in manifest["graphs"].items()}
    linears = {g: find_linears(graph) for g, graph in graphs.items()}
    probed = calibrate._observe(tiny_artifact, manifest, schemes, linears, sequences, CalibOptions(method="entropy"),
                                2, lambda *a: None, tmp_path / "probe")  # fmt: skip
    checked = 0
    for g, (lins, _) in linears.items():
        assert lins
        for lin in lins:
            mine, theirs = layered.input_stats(g, weight_kn(graphs[g], lin)), probed[g][lin.x]
            assert mine.rows == theirs.rows > 0, (g, lin.node)
            assert mine.amax == pytest.approx(theirs.amax, rel=1e-5), (g, lin.node)
            assert mine.hist.sum() == theirs.hist.sum()
            assert np.abs(mine.hist - theirs.hist).sum() <= 0.002 * mine.hist.sum() + 2, (g, lin.node)
            checked += 1
    assert checked == sum(len(lins) for lins, _ in linears.values())


def test_int8_ranges_from_the_checkpoint_else_the_fp32_graphs(tiny_artifact, tiny_checkpoint, ids_file, tmp_path):
    """With the source checkpoint the ranges come from the layer-at-a-time pass; without it calibrate
    probes the fp32 graphs as before (nothing else needs the checkpoint); a changed one is an error."""
    opts = CalibOptions(scheme="int8", **FAST)
    m = calibrate_artifact(tiny_artifact, tmp_path / "q1", [ids_file], [], opts)
    assert m["quantization"]["graphs"]["trunk"]["ranges_from"].startswith("source checkpoint")
    art = tmp_path / "a"
    shutil.copytree(tiny_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["source"] = str(tmp_path / "gone")
    (art / "manifest.json").write_text(json.dumps(manifest))
    m2 = calibrate_artifact(art, tmp_path / "q2", [ids_file], [], opts)
    assert m2["quantization"]["graphs"]["trunk"]["ranges_from"].startswith("fp32 graphs")
    a1, a2 = (m_["quantization"]["graphs"]["trunk"]["activation_amax"] for m_ in (m, m2))
    assert a1 == pytest.approx(a2, rel=1e-5)
    manifest["source"] = str(tiny_checkpoint)  # another checkpoint: its weights are not the graphs'
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NextnError, match="weights are not the source checkpoint's"):
        calibrate_artifact(art, tmp_path / "q3", [ids_file], [], opts)
    assert not (tmp_path / "q3").exists()


def test_a_large_fp32_artifact_is_not_opened_for_the_report(tiny_artifact, ids_file, tmp_path, monkeypatch):
    """Over REPORT_FP32_RAM_FRACTION of RAM, the report's fp32 side is the source checkpoint a layer at a
    time (no fp32 session, no decoding runs): the same agreement figures as from the fp32 artifact."""
    from nextn.calib import calibrate
    from nextn.runtime import engines

    opts = CalibOptions(scheme="int4", weight_method="rtn", **{**FAST, "decode_report": True})
    small_opts = CalibOptions(scheme="int4", weight_method="rtn", **FAST)
    small = calibrate_artifact(tiny_artifact, tmp_path / "a", [ids_file], [], small_opts)["quantization"]["report"]
    opened, real = [], engines.open_engines

    def spy(root, *a, **k):
        opened.append(Path(root).resolve())
        return real(root, *a, **k)

    monkeypatch.setattr(engines, "open_engines", spy)
    monkeypatch.setattr(calibrate, "REPORT_FP32_RAM_FRACTION", 0.0)
    large = calibrate_artifact(tiny_artifact, tmp_path / "b", [ids_file], [], opts)["quantization"]["report"]
    assert large["decoding"] is None  # asked for, but it would run the fp32 artifact
    assert tiny_artifact.resolve() not in opened and opened
    assert large["trunk"]["top1_agreement"] == small["trunk"]["top1_agreement"]
    assert large["trunk"]["kl_mean"] == pytest.approx(small["trunk"]["kl_mean"], rel=1e-3)


def test_experts_in_chunks_give_the_same_weights(tiny_artifact, ids_file, tmp_path, monkeypatch):
    """Expert Hessians over the budget are collected a chunk of experts at a time (the part runs once per
    chunk): every weight GPTQ chooses is the one it chooses with all experts at once."""
    from nextn.calib.calibrate import BLOCK_SIZES

    assert sequential.expert_chunks(8, 10, 100) == [None]
    assert sequential.expert_chunks(8, 10, 30) == [range(0, 3), range(3, 6), range(6, 8)]
    assert sequential.expert_chunks(8, 10, 5) == [None]  # not one fits: the observer refuses, naming the part
    manifest = read_manifest(tiny_artifact, verify=False)
    schemes = {g: "int4" for g in manifest["graphs"]}
    sequences = [list(map(int, line.split())) for line in ids_file.read_text().split("\n") if line][:3]
    settings = sequential.PassSettings(64, 8, BLOCK_SIZES)
    source = Path(manifest["source"])
    whole = sequential.sequential_pass(source, manifest, schemes, sequences, settings, tmp_path / "a")
    chunks, real = [], sequential.expert_chunks

    def three_at_a_time(n, per_expert, room):
        chunks.append(real(n, per_expert, 3 * per_expert))
        return chunks[-1]

    held, real_quantize = [], sequential._quantize_experts

    def count_held(obs, *a):
        held.extend(sum(h is not None for h in stats.h1) for stats in obs.moes.values())
        return real_quantize(obs, *a)

    monkeypatch.setattr(sequential, "expert_chunks", three_at_a_time)
    monkeypatch.setattr(sequential, "_quantize_experts", count_held)
    chunked = sequential.sequential_pass(source, manifest, schemes, sequences, settings, tmp_path / "b")
    assert chunks and all(len(c) > 1 for c in chunks)
    assert held and max(held) <= 3  # Hessians of at most one chunk at a time
    assert {g: set(f) for g, f in whole.files.items()} == {g: set(f) for g, f in chunked.files.items()}
    for graph, files in whole.files.items():
        for key, path in files.items():
            a, b = np.load(path), np.load(chunked.files[graph][key])
            assert all(np.array_equal(a[n], b[n]) for n in a.files), (graph, key)
