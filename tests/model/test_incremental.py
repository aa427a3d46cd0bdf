"""Incremental forward with explicit latent caches equals one full forward; both MLA forms agree."""

import pytest
import torch

from nextn.model.reference import LayerKV
from nextn.model.weights import load_model

TOL = 1e-4


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)[0]


def _cat(past: list[LayerKV], new: list[LayerKV]) -> list[LayerKV]:
    return [LayerKV(torch.cat([p.c_kv, n.c_kv], 1), torch.cat([p.k_pe, n.k_pe], 1)) for p, n in zip(past, new)]


@pytest.mark.parametrize("absorbed", [False, True], ids=["naive", "absorbed"])
@pytest.mark.parametrize("chunks", [[5, 1, 1, 1], [1] * 6, [3, 4, 2]], ids=["prefill+decode", "all-decode", "verify"])
@torch.no_grad()
def test_trunk_incremental_equals_full(model, absorbed, chunks):
    model.absorbed = absorbed
    b, s = 3, sum(chunks)
    ids = torch.randint(0, model.cfg.vocab_size, (b, s))
    pos = torch.arange(s)[None].expand(b, s)
    full = model(ids, pos)
    past = [model.empty_kv(b)] * model.cfg.num_hidden_layers
    start = 0
    for n in chunks:
        out = model(ids[:, start : start + n], pos[:, start : start + n], past)
        assert (out.logits - full.logits[:, start : start + n]).abs().max() <= TOL
        assert (out.hidden - full.hidden[:, start : start + n]).abs().max() <= TOL
        past = _cat(past, out.new_kv)
        start += n
    # The cache built step by step is the one a single full pass produces.
    for got, want in zip(past, full.new_kv):
        assert (got.c_kv - want.c_kv).abs().max() <= TOL
        assert (got.k_pe - want.k_pe).abs().max() <= TOL


@pytest.mark.parametrize("absorbed", [False, True], ids=["naive", "absorbed"])
@torch.no_grad()
def test_mtp_incremental_equals_full(model, absorbed):
    model.absorbed = absorbed
    b, s = 2, 10
    ids = torch.randint(0, model.cfg.vocab_size, (b, s + 1))
    pos = torch.arange(s + 1)[None].expand(b, s + 1)
    hidden = model(ids[:, :s], pos[:, :s]).hidden  # [B, S, H]
    full = model.mtp_forward(0, ids[:, 1:], hidden, pos[:, 1:])
    past = model.empty_kv(b)
    for start, n in [(0, 4), (4, 1), (5, 3), (8, 2)]:
        sl = slice(start, start + n)
        out = model.mtp_forward(0, ids[:, 1:][:, sl], hidden[:, sl], pos[:, 1:][:, sl], past)
        assert (out.logits - full.logits[:, sl]).abs().max() <= TOL
        past = LayerKV(torch.cat([past.c_kv, out.new_kv.c_kv], 1), torch.cat([past.k_pe, out.new_kv.k_pe], 1))


@torch.no_grad()
def test_absorbed_equals_naive_with_long_past(model):
    b, p, s = 2, 200, 3
    ids = torch.randint(0, model.cfg.vocab_size, (b, p + s))
    pos = torch.arange(p + s)[None].expand(b, p + s)
    model.absorbed = False
    prefill = model(ids[:, :p], pos[:, :p])
    naive = model(ids[:, p:], pos[:, p:], prefill.new_kv)
    model.absorbed = True
    absorbed = model(ids[:, p:], pos[:, p:], prefill.new_kv)
    assert (naive.logits - absorbed.logits).abs().max() <= TOL
    assert not torch.equal(naive.logits, absorbed.logits)  # two different computations, not one path twice


@torch.no_grad()
def test_padded_slots_inside_cache_are_ignored(model):
    """A sequence whose cache has garbage in masked slots decodes as if they were absent."""
    model.absorbed = True
    ids = torch.randint(0, model.cfg.vocab_size, (1, 6))
    pos = torch.arange(6)[None]
    clean = model(ids, pos)
    # Same 5-token prefix, with 3 garbage slots inserted before it in the cache.
    junk = model(torch.randint(0, model.cfg.vocab_size, (1, 3)), torch.arange(3)[None]).new_kv
    pre = model(ids[:, :5], pos[:, :5]).new_kv
    past = _cat(junk, pre)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = model(ids[:, 5:], pos[:, 5:], past, attention_mask=mask)
    assert (out.logits[0, 0] - clean.logits[0, 5]).abs().max() <= TOL
    unmasked = model(ids[:, 5:], pos[:, 5:], past)
    assert (unmasked.logits[0, 0] - clean.logits[0, 5]).abs().max() > TOL  # the mask did the work


@pytest.mark.parametrize("absorbed", [False, True], ids=["naive", "absorbed"])
@torch.no_grad()
def test_mtp_output_rows_are_those_rows_of_the_full_forward(model, absorbed):
    """`output_rows` computes attention output, feed-forward and head for the rows asked for only, per
    sequence, and every row's cache entry as before: a catch-up that wants its last row alone."""
    model.absorbed = absorbed
    b, p, s = 2, 3, 5
    ids = torch.randint(0, model.cfg.vocab_size, (b, p + s + 1))
    pos = torch.arange(p + s + 1)[None].expand(b, p + s + 1)
    hidden = model(ids[:, : p + s], pos[:, : p + s]).hidden  # [B, P + S, H]
    pre = model.mtp_forward(0, ids[:, 1 : p + 1], hidden[:, :p], pos[:, 1 : p + 1])
    args = (0, ids[:, p + 1 :], hidden[:, p:], pos[:, p + 1 :], pre.new_kv)
    full = model.mtp_forward(*args)
    rows = torch.tensor([[4], [1]])  # a different row per sequence
    got = model.mtp_forward(*args, output_rows=rows)
    assert got.logits.shape == (b, 1, model.cfg.vocab_size)
    for i, r in enumerate(rows[:, 0].tolist()):
        assert (got.logits[i, 0] - full.logits[i, r]).abs().max() <= TOL
        assert (got.hidden[i, 0] - full.hidden[i, r]).abs().max() <= TOL
    assert torch.equal(got.new_kv.c_kv, full.new_kv.c_kv) and torch.equal(got.new_kv.k_pe, full.new_kv.k_pe)
    both = model.mtp_forward(*args, output_rows=torch.tensor([[0, 4], [2, 3]]))
    assert (both.logits[1, 1] - full.logits[1, 3]).abs().max() <= TOL
