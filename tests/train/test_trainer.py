"""Training code: the objective is DeepSeek-V3's (checked against transformers' MtpModel), loss falls
in a few steps, and the saved checkpoint loads in transformers with the same logits."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_reference import load_hf
from nextn.model.weights import load_model
from nextn.train.corpus import encode_files, stdlib_corpus, train_tokenizer
from nextn.train.trainer import PRESETS, build_model, losses, save_checkpoint, train


@pytest.fixture(scope="module")
def streams():
    corpus = stdlib_corpus()
    tok = train_tokenizer(corpus.train[:12], 256)
    return tok, encode_files(tok, corpus.train[:12]), encode_files(tok, corpus.heldout[:2])


def test_corpus_split_is_disjoint_and_stable():
    a, b = stdlib_corpus(), stdlib_corpus()
    assert a.train == b.train and a.heldout == b.heldout
    assert not set(a.train) & set(a.heldout)
    assert 0.02 < len(a.heldout) / (len(a.train) + len(a.heldout)) < 0.1
    assert not any("test" in p.relative_to(a.root).parts[:-1] for p in a.train + a.heldout)


def test_tokenizer_round_trips_source(streams):
    tok, _, _ = streams
    text = "def f(x):\n    return x ** 2  # square\n"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id("<|eos|>") == 0 and tok.token_to_id("<|bos|>") == 1


@pytest.mark.slow
def test_training_lowers_loss_and_checkpoint_loads_in_transformers(streams, tmp_path):
    tok, train_stream, heldout_stream = streams
    tc = PRESETS["tiny"](tok.get_vocab_size())
    history_rows = []
    model, history = train(tc, train_stream, heldout_stream, lambda step, row: history_rows.append(row))
    assert len(history_rows) == tc.steps
    start, end = history["start_heldout"], history["heldout"]
    assert end["trunk"] < start["trunk"] - 0.5
    assert all(e < s - 0.5 for s, e in zip(start["mtp"], end["mtp"]))

    path = save_checkpoint(model, tmp_path / "ckpt", dtype=torch.float32)
    main, mtp = load_hf(path)
    tokens = torch.from_numpy(heldout_stream[:40].astype(np.int64))[None]  # [1, 40]

    # transformers computes the same objective: trunk CE and per-depth MTP CE of the training code.
    ours_trunk, ours_mtp = losses(model, tokens)
    with torch.no_grad():
        from transformers import DynamicCache

        out = main(tokens, output_hidden_states=True)
        assert F.cross_entropy(out.logits[0, :-1], tokens[0, 1:]).item() == pytest.approx(ours_trunk.item(), abs=1e-4)
        h, t = out.hidden_states[-1], tokens.shape[1]
        for k in range(tc.model.num_nextn_predict_layers):
            n = t - k - 1
            pos = torch.arange(k + 1, t)[None]
            h = mtp.forward_layer(k, h[:, :n], pos, DynamicCache(config=mtp.config), input_ids=tokens[:, k + 1 :])
            ce = F.cross_entropy(mtp._project_to_logits(h)[0, : n - 1], tokens[0, k + 2 :])
            assert ce.item() == pytest.approx(ours_mtp[k].item(), abs=1e-4), f"depth {k}"

    # nextn's own loader reads the written checkpoint back to the trained model.
    loaded, _ = load_model(path)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, torch.arange(40)[None]).logits, model(tokens, torch.arange(40)[None]).logits)


def test_mtp_modules_share_embedding_and_head():
    from nextn.testing import tiny_config

    model = build_model(tiny_config(), seed=0)
    for m in model.mtp:
        assert m.embed_tokens is model.model.embed_tokens and m.shared_head.head is model.lm_head
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith("mtp.") and ("embed_tokens" in n or "shared_head.head" in n) for n in names)
    assert math.isclose(model.lm_head.weight.std().item(), 0.02, rel_tol=0.2)
