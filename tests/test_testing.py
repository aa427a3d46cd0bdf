"""nextn.testing writes checkpoints transformers reads as DeepSeek-V3, with nextn giving the same logits."""

import json

import pytest
import torch
from hf_reference import load_hf

from nextn.model.weights import load_model
from nextn.testing import deepseek_like, tiny_config, write_random_checkpoint


@pytest.mark.parametrize("style", ["official", "hf"])
@torch.no_grad()
def test_random_checkpoint_loads_in_transformers(tmp_path, style):
    path = write_random_checkpoint(tmp_path / "c", tiny_config(), seed=5, style=style, shard_bytes=200_000)
    main, mtp = load_hf(path)
    ours, cfg = load_model(path)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    pos = torch.arange(20)[None].expand(2, 20)
    want = main(ids, use_cache=False, output_hidden_states=True)
    got = ours(ids, pos)
    assert (got.logits - want.logits).abs().max() <= 1e-4
    from transformers.cache_utils import DynamicCache

    h = mtp.forward_layer(0, want.hidden_states[-1][:, :-1], pos[:, 1:], DynamicCache(config=mtp.config),
                          input_ids=ids[:, 1:])  # fmt: skip
    out = ours.mtp_forward(0, ids[:, 1:], got.hidden[:, :-1], pos[:, 1:])
    assert (out.logits - mtp._project_to_logits(h)).abs().max() <= 1e-4


def test_same_seed_same_bytes_and_sizes(tmp_path):
    a = write_random_checkpoint(tmp_path / "a", tiny_config(), seed=1)
    b = write_random_checkpoint(tmp_path / "b", tiny_config(), seed=1)
    c = write_random_checkpoint(tmp_path / "c", tiny_config(), seed=2)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert json.loads((a / "generation_config.json").read_text())["eos_token_id"] == [1]


def test_deepseek_like_sizes():
    """The 1 GB preset is the field notes' 256M-parameter DeepSeek-V3-shaped model."""
    from nextn.model.weights import mtp_shapes, trunk_shapes

    cfg = deepseek_like(1024, 12, mtp=0)
    n = sum(torch.Size(s).numel() for s in trunk_shapes(cfg).values())
    assert 240e6 < n < 270e6
    cfg = deepseek_like(1024, 12, mtp=1)
    mtp = sum(torch.Size(s).numel() for s in mtp_shapes(cfg, 0).values())
    assert mtp < n / 8  # one MTP module costs a small fraction of the trunk
