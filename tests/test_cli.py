"""`nextn inspect`: the numbers, checked against transformers' own parameter counts, and bad input."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from hf_reference import load_hf

from nextn.cli import cli


def _inspect_json(path):
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_inspect_counts_match_transformers(hf_checkpoint):
    s = _inspect_json(hf_checkpoint)
    main, mtp = load_hf(hf_checkpoint)
    cfg = main.config

    def count(module):  # transformers keeps the router bias as a buffer
        return sum(p.numel() for p in module.parameters()) + sum(
            b.numel() for n, b in module.named_buffers() if n.endswith("e_score_correction_bias")
        )

    p = s["parameters"]
    assert p["shared"] + p["trunk"] == count(main)
    assert p["shared"] == main.lm_head.weight.numel() + main.model.embed_tokens.weight.numel()
    assert p["mtp"] == [count(layer) for layer in mtp.layers]  # embedding/head copies are shared, not counted
    assert p["total"] == count(main) + sum(count(layer) for layer in mtp.layers)
    assert s["mtp_depth"] == cfg.num_mtp_layers
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * 1000  # fp32 latent cache per 1k tokens
    kv = s["kv_cache_bytes_per_1k_tokens"]
    assert (kv["per_layer"], kv["trunk"], kv["mtp"]) == (per_layer, per_layer * 3, [per_layer] * cfg.num_mtp_layers)
    assert s["dtypes"]["F32"]["tensors"] > 0 and set(s["dtypes"]) == {"F32"}
    # active per token: routed experts at top-k / n_routed
    experts = sum(layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel()
                  for layer in main.model.layers if hasattr(layer.mlp, "experts"))  # fmt: skip
    assert p["trunk_active_per_token"] == count(main) - experts + experts * 2 // 8


def test_inspect_text(tiny_checkpoint):
    result = CliRunner().invoke(cli, ["inspect", str(tiny_checkpoint)])
    assert result.exit_code == 0
    assert "MTP depth   2" in result.output
    assert "MTP module 1" in result.output
    assert "KV cache    latent, float32" in result.output


def test_inspect_fp8(tmp_path):
    from nextn.testing import tiny_config, write_random_checkpoint

    s = _inspect_json(write_random_checkpoint(tmp_path / "f", tiny_config(), weights="fp8"))
    assert s["config"]["quantization"] == "fp8 e4m3 block [128, 128]"
    assert set(s["dtypes"]) == {"F8_E4M3", "F32", "BF16"}
    assert s["kv_cache_bytes_per_1k_tokens"]["dtype"] == "bfloat16"
    ref = _inspect_json(write_random_checkpoint(tmp_path / "r", tiny_config()))
    assert s["parameters"] == ref["parameters"]  # scales are metadata, not parameters


@pytest.mark.parametrize("make_bad", ["missing", "truncated"])
def test_bad_input_one_line_no_traceback(tiny_checkpoint, tmp_path, make_bad):
    import shutil

    path = shutil.copytree(tiny_checkpoint, tmp_path / "c")
    if make_bad == "missing":
        (path / "config.json").unlink()
    else:
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:5000])
    proc = subprocess.run([sys.executable, "-m", "nextn.cli", "inspect", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(path) in lines[0]
    assert "Traceback" not in proc.stderr
