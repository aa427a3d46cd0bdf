"""`nextn export --quantize`: one command, the same artifact as export + `nextn calibrate --weight-method rtn`,
no fp32 artifact left behind."""

import subprocess
from pathlib import Path
import sys

import numpy as np
import onnx
import pytest

from nextn.calib.calibrate import CalibOptions, calibrate_artifact, quantize_checkpoint
from nextn.export.exporter import ExportOptions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("ids") / "calib.ids"
    path.write_text("\n".join(" ".join(map(str, rng.integers(2, 256, 24))) for _ in range(5)))
    return path


def _nodes(path):
    m = onnx.load(str(path), load_external_data=False)
    return [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node]


def _spy_on_the_scratch(monkeypatch) -> dict:
    """What the temporary fp32 export holds when the rewrite starts: its bytes, and the bytes its graphs
    refer to in the never-written deferred file."""
    from onnx.external_data_helper import ExternalDataInfo

    from nextn.calib import calibrate
    from nextn.export.stream import DeferredWeights

    seen, real = {}, calibrate.calibrate_artifact

    def spy(artifact, *a, **k):
        seen["bytes"] = sum(p.stat().st_size for p in Path(artifact).rglob("*") if p.is_file())
        seen["deferred"] = sum(ExternalDataInfo(t).length for g in Path(artifact).glob("*.onnx")
                               for t in onnx.load(str(g), load_external_data=False).graph.initializer
                               if t.data_location == onnx.TensorProto.EXTERNAL
                               and ExternalDataInfo(t).location == DeferredWeights.LOCATION)  # fmt: skip
        seen["written"] = [p.name for p in Path(artifact).iterdir() if p.name == "weights.bin" or p.suffix == ".data"]
        return real(artifact, *a, **k)

    monkeypatch.setattr(calibrate, "calibrate_artifact", spy)
    return seen


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantize_at_export_equals_export_then_calibrate(tiny_tokenized_checkpoint, tiny_artifact, ids_file, tmp_path,
                                                         scheme, monkeypatch):  # fmt: skip
    """The same bytes as export + calibrate, and no fp32 weights written on the way: while the rewrite runs
    the temporary export holds graphs only, every tensor the fp32 artifact keeps outside its graphs being a
    reference into a file never written (read from the checkpoint when the rewrite reaches it). The fp32
    artifact is the session's tiny_artifact, the default export of tiny_tokenized_checkpoint (the calibration
    reads the ids file, not its tokenizer)."""
    opts = CalibOptions(scheme=scheme, weight_method="rtn", samples=4, seq_len=24, eval_samples=1, min_top1=0.0,
                        decode_report=False)  # fmt: skip
    fp32_artifact = tiny_artifact
    one = tmp_path / "one" / "art"
    seen = _spy_on_the_scratch(monkeypatch)
    m1 = quantize_checkpoint(tiny_tokenized_checkpoint, one, ExportOptions(), opts, [ids_file])
    fp32_bytes = (fp32_artifact / "weights.bin").stat().st_size  # shared embedding and head once
    assert not seen["written"] and seen["deferred"] >= 0.7 * fp32_bytes and seen["bytes"] < seen["deferred"], seen
    two = tmp_path / "two"
    m2 = calibrate_artifact(fp32_artifact, two, [ids_file], [], opts)
    # the one-command report compares with the checkpoint's fp32 logits computed a layer at a time, the
    # other with the fp32 artifact in ONNX Runtime: the same figures up to float rounding
    r1, r2 = m1["quantization"]["report"]["trunk"], m2["quantization"]["report"]["trunk"]
    assert r1["positions"] == r2["positions"] and r1["top1_agreement"] == r2["top1_agreement"]
    assert r1["kl_mean"] == pytest.approx(r2["kl_mean"], rel=1e-3, abs=1e-6)
    assert r1["perplexity_fp32"] == pytest.approx(r2["perplexity_fp32"], rel=1e-4)
    s1, s2 = m1["quantization"]["report"]["size"], m2["quantization"]["report"]["size"]
    assert s1["bytes"] == s2["bytes"] and s1["fp32_bytes"] == pytest.approx(s2["fp32_bytes"], rel=0.05), (s1, s2)
    assert (one / "weights.bin").read_bytes() == (two / "weights.bin").read_bytes()
    for g in ("trunk.onnx", "mtp_0.onnx", "mtp_1.onnx"):
        assert _nodes(one / g) == _nodes(two / g)
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["art"]  # the scratch is gone


def test_export_quantize_cli(tiny_checkpoint, ids_file, tmp_path):
    def nextn(*args):
        return subprocess.Popen([sys.executable, "-c", "from nextn.cli import main; main()", *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def result(proc):
        out, err = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    # The refused commands run beside the export (each is mostly a Python start-up, which CI's second core
    # would otherwise idle through); each has its own output folder, so what each leaves behind is its own.
    bad = {
        "bad0": (["--data", ids_file], "--data/--min-top1: only with --quantize"),
        "bad1": (["--quantize", "int4", "--dtype", "bf16", "--data", ids_file], "quantizes an fp32 export"),
        "bad2": (["--quantize", "int4"], "has no tokenizer.json; give calibration token ids"),
        "bad3": (["--quantize", "int8", "--data", ids_file, "--validation", "full"], "drop --validation full"),
    }
    refused = {name: nextn("export", tiny_checkpoint, "-o", tmp_path / name, *args) for name, (args, _) in bad.items()}
    out = tmp_path / "q"
    r = result(nextn("export", tiny_checkpoint, "-o", out, "--quantize", "int4", "--data", ids_file, "--min-top1", "0"))
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout and (out / "quality_report.json").is_file()
    r = result(nextn("run", out, "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--json"))
    assert r.returncode == 0, r.stderr
    for name, (_, message) in bad.items():
        r = result(refused[name])
        assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / name).exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}")]
