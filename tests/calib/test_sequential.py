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
    real_gptq, real_pass = sequential.gptq, sequential.sequential_gptq

    def gptq(w, h, *a, **k):
        hessians[sequential.fingerprint(w)] = h.copy()
        return real_gptq(w, h, *a, **k)

    def run(source, manifest, schemes, seqs, *a, **k):
        sequences.extend(seqs)
        return real_pass(source, manifest, schemes, seqs, *a, **k)

    monkeypatch.setattr(sequential, "gptq", gptq)
    monkeypatch.setattr(sequential, "sequential_gptq", run)
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
    real_load, real_pass = streamed.load_tensors, sequential.sequential_gptq

    def load_tensors(model, *a, **k):
        real_load(model, *a, **k)
        blocks = [*model.model.layers, *model.mtp]
        loaded.append(sum(any(not p.is_meta for n, p in b.named_parameters() if "embed" not in n and "head" not in n)
                          for b in blocks))  # fmt: skip

    def run(*a, **k):
        made.append(real_pass(*a, **k))
        return made[-1]

    monkeypatch.setattr(streamed, "load_tensors", load_tensors)  # what TopLoaded loads every group with
    monkeypatch.setattr(sequential, "sequential_gptq", run)
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
