"""The shipped model: loads in transformers with the same greedy tokens as nextn, keeps its acceptance,
and `nextn demo` runs end to end."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nextn.bench.baselines import load_transformers
from nextn.bench.latency import load_prompts
from nextn.cli import cli
from nextn.embedded import embedded_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def heldout(embedded_cache):
    import nextn

    with nextn.load(embedded_cache) as m:
        return load_prompts(None, m.tokenizer, m.engines.manifest["config"]["vocab_size"], 48, 3)


def test_inspect_defaults_to_the_embedded_model():
    r = CliRunner().invoke(cli, ["inspect", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["mtp_depth"] >= 2 and s["config"]["num_hidden_layers"] >= 8 and s["tokenizer"]
    assert sum(f.stat().st_size for f in embedded_checkpoint().iterdir()) <= 25 * 2**20


def test_greedy_tokens_equal_transformers(embedded_cache, heldout):
    import nextn

    hf, n_mtp = load_transformers(embedded_checkpoint())
    assert n_mtp >= 2
    with nextn.load(embedded_cache) as model:
        model.eos_ids = ()
        for prompt in heldout:
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                want = hf.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
                want_mtp = hf.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, eos_token_id=None,
                                       pad_token_id=0, use_mtp=True)[0, len(prompt):].tolist()  # fmt: skip
            assert want_mtp == want
            for k in (0, 2, 4):
                assert model.generate(prompt, max_new_tokens=40, draft=k).token_ids == want, f"K={k}"
        batch = model.generate(heldout, max_new_tokens=24, draft=2)
        assert [r.token_ids for r in batch] == [model.generate(p, max_new_tokens=24).token_ids for p in heldout]


def test_drafts_are_accepted(embedded_cache, heldout):
    """The trained MTP modules agree with the trunk far beyond chance (a regression guard on the shipped
    weights; BENCHMARKS.md has the full figures)."""
    import nextn

    with nextn.load(embedded_cache) as model:
        model.eos_ids = ()
        drafted = accepted = 0
        for p in heldout:
            s = model.generate(p, max_new_tokens=64, draft=1).stats
            drafted, accepted = drafted + s["drafted"], accepted + s["accepted"]
    assert accepted / drafted >= 0.6


def test_demo_end_to_end(embedded_cache, heldout):
    """The demo (and every command given no artifact) runs the fp32 export's trunk with int4 MTP graphs
    drafting, cached beside the export: its output is the fp32 export's, token for token, at every K."""
    import nextn

    r = CliRunner().invoke(cli, ["demo", "--repeats", "1", "--max-new-tokens", "24", "--draft", "2", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    artifact = Path(d["artifact"])  # <export>-drafts-int4-<digest of calibrate's options>
    assert d["identical"] and d["drafts"] == "int4" and artifact.name.startswith(f"{embedded_cache.name}-drafts-int4-")
    assert d["plain"]["new_tokens"] == d["drafted"]["new_tokens"] > 0
    assert len(d["drafted"]["accepted_per_position"]) == 2 and d["speedup"] > 0
    scheme = json.loads((artifact / "manifest.json").read_text())["quantization"]["report"]["scheme"]
    assert scheme["trunk"] == "fp32" and scheme["mtp"] == "int4"
    with nextn.load(embedded_cache) as exact, nextn.load(artifact) as cheap:
        for m in (exact, cheap):
            m.eos_ids = ()
        for prompt in heldout[:2]:
            want = exact.generate(prompt, max_new_tokens=32, draft=0).token_ids
            assert all(cheap.generate(prompt, max_new_tokens=32, draft=k).token_ids == want for k in (0, 1, 3, "auto"))
    r = CliRunner().invoke(cli, ["demo", "--repeats", "1", "--max-new-tokens", "8"])
    assert r.exit_code == 0 and "speedup" in r.output and "identical with and without drafting" in r.output
    assert "drafts from int4 MTP graphs" in r.output
    r = CliRunner().invoke(cli, ["demo", "--repeats", "1", "--max-new-tokens", "8", "--drafts", "fp32", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["artifact"] == str(embedded_cache)


@pytest.mark.slow
def test_demo_quantized_and_auto(embedded_cache):
    """demo --quant int8 quantizes the embedded model once (cached beside its export) and runs it; auto's
    choices are shown with this machine's step costs."""
    r = CliRunner().invoke(cli, ["demo", "--quant", "int8", "--repeats", "1", "--max-new-tokens", "16", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    artifact = Path(d["artifact"])  # <export>-int8-<digest of calibrate's options>
    assert d["identical"] and artifact.name.startswith(f"{embedded_cache.name}-int8-") and d["draft"] == "auto"
    assert d["step_cost"][0] == 1.0 and len(d["step_cost"]) == 5
    assert sum(d["drafted"]["draft_histogram"].values()) == d["drafted"]["steps"]
    assert artifact.parent == embedded_cache.parent
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["quantization"]["report"]["scheme"]["trunk"] == "int8"
    r = CliRunner().invoke(cli, ["demo", "--quant", "int3"])
    assert r.exit_code != 0 and "int3" in r.output


@pytest.mark.slow
def test_int4_keeps_the_trunk_top1_and_the_drafts(embedded_cache, tmp_path):
    """Issue 7's quality target on the embedded model, with `nextn calibrate`'s defaults (int4 GPTQ on the
    stdlib training split, evaluated on held-out files): trunk top-1 agreement >= 0.95."""
    from nextn.calib.calibrate import CalibOptions, calibrate_artifact

    m = calibrate_artifact(embedded_cache, tmp_path / "int4", [], [], CalibOptions(decode_report=False))
    rep = m["quantization"]["report"]
    assert rep["scheme"] == {"trunk": "int4", "mtp": "int4"}
    assert rep["trunk"]["top1_agreement"] >= 0.95, rep["trunk"]
    assert rep["trunk"]["perplexity"] < 1.02 * rep["trunk"]["perplexity_fp32"], rep["trunk"]
