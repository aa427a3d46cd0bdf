"""Exported graphs in ONNX Runtime against transformers, the manifest, and bad input.

Exports take tens of seconds each, so every artifact is built once per session (slow tests, run in CI).
"""

import json
import logging
import shutil

import numpy as np
import onnx
import pytest
import torch
from hf_reference import load_hf
from side_by_side import export_side_by_side

from nextn.errors import NextnError
from nextn.export.exporter import ExportOptions, export_checkpoint
from nextn.export.manifest import read_manifest, sha256_file
from nextn.export.validate import make_session
from nextn.model.config import ModelConfig

pytestmark = pytest.mark.slow
TOL = 1e-4


@pytest.fixture(scope="session")
def half_artifacts(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("half")
    jobs = {d: (tiny_checkpoint, root / d, ExportOptions(dtype=d, mtp_layers=1)) for d in ("fp16", "bf16")}
    export_side_by_side(jobs).all()  # two independent exports: side by side
    return {d: root / d for d in jobs}


class Graphs:
    """The artifact's graphs in ONNX Runtime, fed and read by name."""

    def __init__(self, artifact):
        self.manifest = read_manifest(artifact, verify=True)
        self.cfg = ModelConfig.from_dict(self.manifest["config"])
        self.sessions = {n: make_session(artifact / g["file"]) for n, g in self.manifest["graphs"].items()}
        self.np = np.float16 if self.manifest["dtype"] == "float16" else np.float32

    def empty(self, b):
        c = self.cfg
        return np.zeros((b, 0, c.kv_lora_rank), self.np), np.zeros((b, 0, c.qk_rope_head_dim), self.np)

    def trunk(self, ids, pos, past=None):
        b, s = ids.shape
        past = past or [self.empty(b)] * self.cfg.num_hidden_layers
        p = past[0][0].shape[1]
        feed = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attention_mask": np.ones((b, p + s), np.int64)}
        for i, (c, k) in enumerate(past):
            feed[f"past.{i}.c_kv"], feed[f"past.{i}.k_pe"] = c, k
        out = self.sessions["trunk"].run(None, feed)
        new = [(out[2 + 2 * i], out[3 + 2 * i]) for i in range(self.cfg.num_hidden_layers)]
        return out[0], out[1], new

    def mtp(self, k, ids, hidden, pos, rows=None):
        b, s = ids.shape
        c, kp = self.empty(b)
        rows = np.tile(np.arange(s), (b, 1)) if rows is None else rows  # [B, N]: every row by default
        feed = {"input_ids": ids.numpy(), "hidden": hidden, "position_ids": pos.numpy(),
                "attention_mask": np.ones((b, s), np.int64), "past.c_kv": c, "past.k_pe": kp, "output_rows": rows}  # fmt: skip
        return self.sessions[f"mtp_{k}"].run(None, feed)


def _pos(b, s, start=0):
    return (torch.arange(s) + start)[None].expand(b, s).contiguous()


@pytest.mark.parametrize("b,s", [(1, 1), (3, 7), (1, 300)])
@torch.no_grad()
def test_graphs_match_transformers(hf_artifact, b, s):
    """Trunk and every MTP depth (chained on the graphs' own hidden states) vs transformers, fp32 1e-4."""
    from transformers.cache_utils import DynamicCache

    checkpoint, artifact = hf_artifact
    main, mtp = load_hf(checkpoint)
    g = Graphs(artifact)
    ids = torch.randint(0, g.cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(s))
    want = main(ids, use_cache=False, output_hidden_states=True)
    logits, hidden, _ = g.trunk(ids, _pos(b, s))
    assert np.abs(logits - want.logits.numpy()).max() <= TOL
    want_h = want.hidden_states[-1]
    for k in range(g.cfg.num_nextn_predict_layers):
        n = s - 1 - k
        if n <= 0:
            break
        tok, pos = ids[:, k + 1 :], _pos(b, n, k + 1)
        want_h = mtp.forward_layer(k, want_h[:, :n], pos, DynamicCache(config=mtp.config), input_ids=tok)
        want_logits = mtp._project_to_logits(want_h).numpy()
        last, _, _, _ = g.mtp(k, tok, hidden[:, :n], pos, np.full((b, 1), n - 1))  # the last row's output only
        assert np.abs(last[:, 0] - want_logits[:, -1]).max() <= TOL, f"depth {k}, last row"
        m_logits, hidden, _, _ = g.mtp(k, tok, hidden[:, :n], pos)
        assert np.abs(m_logits - want_logits).max() <= TOL, f"depth {k}"


@torch.no_grad()
def test_incremental_decoding_through_graphs_equals_full_forward(hf_artifact):
    checkpoint, artifact = hf_artifact
    main, _ = load_hf(checkpoint)
    g = Graphs(artifact)
    b, s = 2, 12
    ids = torch.randint(0, g.cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    want = main(ids, use_cache=False).logits.numpy()
    past, start = None, 0
    for n in (5, 1, 3, 1, 2):  # prefill, decode, a verify-sized step, ...
        logits, _, new = g.trunk(ids[:, start : start + n], _pos(b, n, start), past)
        assert np.abs(logits - want[:, start : start + n]).max() <= TOL
        past = new if past is None else [(np.concatenate([p[0], q[0]], 1), np.concatenate([p[1], q[1]], 1))
                                         for p, q in zip(past, new)]  # fmt: skip
        start += n


def test_manifest(hf_artifact):
    checkpoint, artifact = hf_artifact
    m = read_manifest(artifact, verify=True)
    cfg = ModelConfig.from_dict(m["config"])
    assert set(m["graphs"]) == {"trunk"} | {f"mtp_{k}" for k in range(cfg.num_nextn_predict_layers)}
    for name, graph in m["graphs"].items():
        model = onnx.load(str(artifact / graph["file"]), load_external_data=False)
        assert [i.name for i in model.graph.input] == [s["name"] for s in graph["inputs"]]
        assert [o.name for o in model.graph.output] == [s["name"] for s in graph["outputs"]]
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        assert dims["input_ids"] == ["batch", "new_tokens"] and dims["attention_mask"] == ["batch", "total_len"]
        past = "past.0.c_kv" if name == "trunk" else "past.c_kv"
        assert dims[past] == ["batch", "past_len", cfg.kv_lora_rank]
        if name != "trunk":
            outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
            assert dims["output_rows"] == ["batch", "output_rows"] and outs["logits"][:2] == ["batch", "output_rows"]
        assert model.opset_import[0].version == m["opset"] == 23
        # Standard ONNX ops, but for ONNX Runtime's fused MoE and residual norms and nextn's attention (an ONNX
        # function the graph carries) where the form is fused (--moe sparse: none; test_fused_moe.py,
        # test_lean_attention.py).
        contrib = {n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")}
        fused = {"MoE", "MoEGroupRouter", "SkipSimplifiedLayerNormalization", "MlaAttention"}
        assert contrib <= (fused if m["moe"] == "fused" else set())
        assert {f.name for f in model.functions} == ({"MlaAttention"} & contrib)
    for f, meta in m["files"].items():
        assert sha256_file(artifact / f) == meta["sha256"]
    assert {"torch", "onnx", "onnxruntime", "onnxscript", "nextn"} <= set(m["tools"])
    assert m["eos_token_ids"] == [1]
    assert (artifact / "generation_config.json").is_file() and (artifact / "config.json").is_file()
    # Shared weights once: the embedding and head appear in every graph but are stored once.
    w = m["weights"]
    assert w["references"] > w["tensors"] and len(w["shared"]) >= 1
    assert w["bytes"] <= 1.05 * w["unique_weight_bytes"]
    assert all(r["max_abs"] <= r["bound"] for r in m["validation"])
    assert {(r["new_tokens"], r["past_len"]) for r in m["validation"]} >= {(1, 0), (7, 0), (1, 5)}


@torch.no_grad()
def test_half_precision_exports(half_artifacts, tiny_checkpoint):
    """fp16 graphs in ONNX Runtime vs transformers in fp32, within the stated fp16 tolerance."""
    from nextn.model.weights import load_model

    main, _ = load_hf(tiny_checkpoint)
    ids = torch.randint(0, main.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    want = main(ids, use_cache=False).logits.numpy()
    fp16 = Graphs(half_artifacts["fp16"])
    logits, _, _ = fp16.trunk(ids, _pos(2, 9))
    assert logits.dtype == np.float16
    assert np.abs(logits.astype(np.float32) - want).max() <= 2e-2 * np.abs(want).max()
    ref, _ = load_model(tiny_checkpoint, mtp_layers=1)
    bf16 = read_manifest(half_artifacts["bf16"], verify=True)
    assert bf16["dtype"] == "bfloat16" and all(r["max_abs"] <= r["bound"] for r in bf16["validation"])
    model = onnx.load(str(half_artifacts["bf16"] / "trunk.onnx"), load_external_data=False)
    kinds = {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.BFLOAT16 in kinds or any(
        i.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for i in model.graph.output
    )
    # 16-bit weights: half the fp32 bytes (the fp32 router and the graphs' small constants aside).
    fp32_bytes = sum(p.numel() * 4 for p in {p.data_ptr(): p for p in ref.parameters()}.values())
    for art in half_artifacts.values():
        assert read_manifest(art)["weights"]["bytes"] < 0.55 * fp32_bytes


# -- bad input and failure handling ----------------------------------------------------------------
def test_mtp_layers_above_checkpoint_is_an_error(tiny_checkpoint, tmp_path):
    with pytest.raises(NextnError, match="--mtp-layers 3: .* has 2 MTP module"):
        export_checkpoint(tiny_checkpoint, tmp_path / "o", ExportOptions(mtp_layers=3))
    assert not (tmp_path / "o").exists()


def test_non_empty_output_needs_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(NextnError, match="folder exists and is not empty .*--force"):
        export_checkpoint(tiny_checkpoint, out, ExportOptions())
    assert (out / "keep.txt").read_text() == "x"


def test_too_little_disk_fails_before_writing(tiny_checkpoint, tmp_path, monkeypatch):
    import nextn.export.exporter as exporter

    monkeypatch.setattr(exporter.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(NextnError, match="GiB free, the export needs about"):
        export_checkpoint(tiny_checkpoint, tmp_path / "o", ExportOptions())
    assert list(tmp_path.iterdir()) == []


def test_trunk_only_warning_force_and_failed_validation(tmp_path, caplog, monkeypatch):
    """No MTP modules: trunk alone with a warning; --force replaces; a failed validation leaves nothing."""
    from nextn.testing import tiny_config, write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path / "c", tiny_config(num_nextn_predict_layers=0))
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with caplog.at_level(logging.WARNING):
        m = export_checkpoint(ckpt, out, ExportOptions(force=True))
    assert "has no MTP modules: exporting the trunk alone" in caplog.text
    assert set(m["graphs"]) == {"trunk"} and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "o"]

    import nextn.export.validate as validate

    monkeypatch.setitem(validate.TOLERANCES, "float32", validate.Tolerance(1e-12, False))
    with pytest.raises(NextnError, match=r"validation failed: trunk logits .* > 1e-12; nothing written"):
        export_checkpoint(ckpt, tmp_path / "o2", ExportOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "o"]  # no o2, no temporary folder


def test_cli_export_and_inspect(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from nextn.cli import cli

    out = tmp_path / "a"
    r = CliRunner().invoke(cli, ["export", str(tiny_checkpoint), "-o", str(out), "--mtp-layers", "1"])
    assert r.exit_code == 0, r.output
    assert "trunk     logits      max abs" in r.output and "mtp_0     logits" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    s = json.loads(r.output)
    assert s["kind"] == "artifact" and s["mtp_depth"] == 1 and set(s["graphs"]) == {"trunk", "mtp_0"}
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert "in  past.0.c_kv      float32  [batch, past_len, 32]" in r.output
    (out / "weights.bin").write_bytes(b"truncated")
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 1 and "weights.bin: size 9 differs from the manifest" in r.output
