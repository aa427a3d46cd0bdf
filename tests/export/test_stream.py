"""The streamed export (stream.py) against the whole-model export: the same graphs, byte for byte,
and the same weights.bin, on checkpoints that cover every form (transformers-written ones, FP8 and
16-bit conversions, naive attention, per-expert MoE); its truncated validation; its memory."""

import filecmp
import json
import subprocess
import sys

import onnx
import pytest
import torch

from nextn.export.exporter import ExportOptions, export_checkpoint

pytestmark = pytest.mark.slow


def assert_same_artifact(a, b):
    assert filecmp.cmp(a / "weights.bin", b / "weights.bin", shallow=False), "weights.bin differs"
    graphs = sorted(p.name for p in a.glob("*.onnx"))
    assert graphs == sorted(p.name for p in b.glob("*.onnx"))
    for g in graphs:
        pa, pb = onnx.load(a / g, load_external_data=False), onnx.load(b / g, load_external_data=False)
        assert pa.SerializeToString() == pb.SerializeToString(), f"{g} differs"


def test_streamed_equals_whole_model_export(hf_artifact, tmp_path):
    """hf_artifact is exported streamed (the default); the whole-model export of the same checkpoint."""
    checkpoint, streamed = hf_artifact
    assert json.loads((streamed / "manifest.json").read_text())["validation_scope"] == "full"
    export_checkpoint(checkpoint, tmp_path / "whole", ExportOptions(stream=False))
    assert_same_artifact(tmp_path / "whole", streamed)


@pytest.mark.parametrize(
    "weights,opts",
    [
        ("fp8", dict(attention="naive")),  # FP8 dequantized, naive MLA
        ("float32", dict(dtype="bf16", moe="sparse", mtp_layers=1)),  # 16-bit weights, per-expert MoE
    ],
)
def test_streamed_equals_whole_model_export_forms(tmp_path, weights, opts):
    from nextn.testing import tiny_config, write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path / "c", tiny_config(), seed=3, weights=weights)
    export_checkpoint(ckpt, tmp_path / "whole", ExportOptions(stream=False, **opts))
    export_checkpoint(ckpt, tmp_path / "streamed", ExportOptions(**opts))
    assert_same_artifact(tmp_path / "whole", tmp_path / "streamed")


def test_truncated_validation(tiny_checkpoint, tmp_path):
    """Validation of a model too large to hold: the trunk on a twin of its first dense and MoE layers, each MTP
    graph whole on normed random hidden states; the twin's files do not stay in the artifact."""
    m = export_checkpoint(tiny_checkpoint, tmp_path / "a", ExportOptions(validation="truncated"))
    assert m["validation_scope"].startswith("truncated: trunk graph of layers 0-1 of 3")
    graphs = {r["graph"] for r in m["validation"]}
    assert graphs == {"trunk[:2]", "mtp_0", "mtp_1"}
    assert all(r["max_abs"] <= r["bound"] for r in m["validation"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".")) == []


def test_truncated_validation_compares(tiny_checkpoint, tmp_path, monkeypatch):
    """The truncated check is a real check: a reference whose final norm differs by 1% fails it."""
    import nextn.export.exporter as exporter
    from nextn.errors import NextnError

    real = exporter.partial_model

    def off(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.01)
        return model

    monkeypatch.setattr(exporter, "partial_model", off)
    with pytest.raises(NextnError, match=r"validation failed: trunk\[:2\] logits"):
        export_checkpoint(tiny_checkpoint, tmp_path / "a", ExportOptions(validation="truncated", mtp_layers=0))
    assert not (tmp_path / "a").exists()


MEMORY_SCRIPT = """
import resource, sys
from nextn.export.exporter import ExportOptions, export_checkpoint
export_checkpoint(sys.argv[1], sys.argv[2], ExportOptions(stream=sys.argv[3] == "stream"))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_streamed_export_memory(tmp_path):
    """On a mid-size checkpoint the streamed export's peak RSS stays far below the whole-model export's,
    which holds the weights (each in its own process, the same imports and tracing; ru_maxrss)."""
    from nextn.testing import deepseek_like, write_random_checkpoint

    cfg = deepseek_like(512, 8, vocab=8000, experts=16)  # ~110M parameters, 440 MB as fp32
    ckpt = write_random_checkpoint(tmp_path / "c", cfg, weights="fp8")
    peaks = {}
    for mode in ("stream", "whole"):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(ckpt), str(tmp_path / mode), mode],
                             capture_output=True, text=True, check=True, cwd=tmp_path)  # fmt: skip
        peaks[mode] = int(out.stdout.split()[-1])
    weights = (tmp_path / "stream" / "weights.bin").stat().st_size
    assert_same_artifact(tmp_path / "whole", tmp_path / "stream")
    # the streamed export holds a few layers where the whole-model one holds all of them
    assert peaks["stream"] < peaks["whole"] - 0.5 * weights, (peaks, weights)
