"""The PyTorch reference against transformers' DeepseekV3ForCausalLM and MtpModel (fp32, 1e-4 abs)."""

import pytest
import torch
from hf_reference import load_hf

from nextn.model.weights import load_model

TOL = 1e-4
SHAPES = [(1, 1), (3, 1), (1, 7), (3, 7), (1, 300), (3, 300)]  # (batch, sequence)


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    main, mtp = load_hf(hf_checkpoint)
    ours, cfg = load_model(hf_checkpoint)
    return main, mtp, ours, cfg


def _ids(b, s, vocab, seed):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def _positions(b, s, start=0):
    return (torch.arange(s) + start)[None].expand(b, s)


@pytest.mark.parametrize("absorbed", [False, True], ids=["naive", "absorbed"])
@pytest.mark.parametrize("b,s", SHAPES)
@torch.no_grad()
def test_trunk_matches_transformers(models, b, s, absorbed):
    main, _, ours, cfg = models
    ours.absorbed = absorbed
    ids = _ids(b, s, cfg.vocab_size, seed=b * 1000 + s)
    want = main(ids, use_cache=False, output_hidden_states=True)
    got = ours(ids, _positions(b, s))
    assert (got.logits - want.logits).abs().max() <= TOL
    assert (got.hidden - want.hidden_states[-1]).abs().max() <= TOL
    assert want.logits.abs().max() > 0.5  # the tolerance is meaningful at this scale


@pytest.mark.parametrize("absorbed", [False, True], ids=["naive", "absorbed"])
@pytest.mark.parametrize("b,s", [(1, 2), (3, 8), (1, 300), (3, 300)])
@torch.no_grad()
def test_mtp_matches_transformers(models, b, s, absorbed):
    """Every MTP depth, chained as transformers chains it: depth k sees tokens k+1.., hidden of depth k-1."""
    from transformers.cache_utils import DynamicCache

    main, mtp, ours, cfg = models
    ours.absorbed = absorbed
    ids = _ids(b, s, cfg.vocab_size, seed=7 * s + b)
    want_h = main(ids, use_cache=False, output_hidden_states=True).hidden_states[-1]  # [B, S, H]
    got_h = ours(ids, _positions(b, s)).hidden
    assert cfg.num_nextn_predict_layers == len(mtp.layers) >= 1
    for k in range(cfg.num_nextn_predict_layers):
        n = s - 1 - k  # tokens k+1 .. s-1 pair with hiddens at positions k .. s-2
        if n <= 0:
            break
        tok, pos = ids[:, k + 1 :], _positions(b, n, start=k + 1)
        want_h = mtp.forward_layer(k, want_h[:, :n], pos, DynamicCache(config=mtp.config), input_ids=tok)
        want_logits = mtp._project_to_logits(want_h)
        out = ours.mtp_forward(k, tok, got_h[:, :n], pos)
        got_h = out.hidden
        assert (out.logits - want_logits).abs().max() <= TOL, f"depth {k}"
        assert (got_h - want_h).abs().max() <= TOL, f"depth {k}"


@torch.no_grad()
def test_left_padded_batch_matches_transformers(models):
    """Sequences of different lengths in one batch: attention_mask hides the padding, as in transformers."""
    main, _, ours, cfg = models
    b, s = 3, 12
    lengths = [12, 9, 4]
    ids = _ids(b, s, cfg.vocab_size, seed=3)
    mask = torch.zeros(b, s, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, s - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions restart at each sequence's first real token
    want = main(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    got = ours(ids, pos, attention_mask=mask).logits
    for i, n in enumerate(lengths):
        assert (got[i, s - n :] - want[i, s - n :]).abs().max() <= TOL
        alone = ours(ids[i : i + 1, s - n :], _positions(1, n)).logits[0]
        assert (got[i, s - n :] - alone).abs().max() <= TOL
    assert torch.isfinite(got).all()  # fully masked padding rows stay finite
