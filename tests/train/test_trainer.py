"""Training code: the objective is DeepSeek-V3's (checked against transformers' MtpModel), loss falls
in a few steps, and the saved checkpoint loads in transformers with the same logits."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_reference import load_hf
from nextn.model.weights import load_model
from nextn.train.corpus import encode_files, stdlib_corpus, train_tokenizer
from nextn.train.trainer import (
    GREEDY_PROMPT, PRESETS, build_model, distill_mtp, draft_agreement, greedy_prompt_len, greedy_windows, losses,
    save_checkpoint, train,
)


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

    # Stage 2 moves the MTP modules towards the trunk and nothing else.
    before = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    trunk_logits = loaded(tokens, torch.arange(40)[None]).logits.detach()
    start = _mtp_vs_trunk(loaded, tokens)
    # half of each batch from the trunk's greedy continuations (16 corpus tokens, 16 of the trunk's)
    distill_mtp(loaded, train_stream, dataclasses.replace(tc, distill_steps=12, distill_batch=4, distill_lr=3e-3,
                                                          distill_greedy=0.5))
    distill_mtp(copy.deepcopy(loaded), train_stream, dataclasses.replace(tc, distill_steps=1, distill_batch=2,
                                                                         distill_greedy=1.0))  # all from the pool
    with torch.no_grad():
        assert torch.equal(loaded(tokens, torch.arange(40)[None]).logits, trunk_logits)
    changed = {n for n, p in loaded.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("mtp.") for n in changed)
    assert not any("embed_tokens" in n or "shared_head.head" in n for n in changed)
    assert _mtp_vs_trunk(loaded, tokens) < start


def test_greedy_windows_continue_with_the_trunks_argmax_and_agreement_counts_matches(streams):
    """The pool's continuations (decoded with the latent cache) are what a full forward pass picks, and
    draft_agreement counts, per depth, drafts equal to the trunk's pick for the same token."""
    tok, train_stream, _ = streams
    model = build_model(PRESETS["tiny"](tok.get_vocab_size()).model, seed=0).eval()
    t = 12
    p = greedy_prompt_len(t)  # a short window: half of it is the prompt
    assert p == 6 and greedy_prompt_len(256) == GREEDY_PROMPT
    batch = greedy_windows(model, train_stream, 3, t, np.random.default_rng(0), chunk=2)
    assert batch.shape == (3, t)
    pos = torch.arange(t)[None].expand(3, t)
    with torch.no_grad():
        out = model(batch, pos)
        assert torch.equal(out.logits[:, p - 1 : -1].argmax(-1), batch[:, p:])
        want, hidden, expected = out.logits.argmax(-1), out.hidden, []
        for k in range(len(model.mtp)):
            o = model.mtp_forward(k, batch[:, k + 1 :], hidden[:, : t - k - 1], pos[:, k + 1 :])
            drafts = o.logits.argmax(-1)  # position j drafts token j + k + 2
            hits = [(drafts[r, j] == want[r, j + k + 1]).item() for r in range(3) for j in range(t - k - 1)
                    if j + k + 2 >= p]  # fmt: skip
            expected.append(sum(hits) / len(hits))
            hidden = o.hidden
    assert draft_agreement(model, batch, chunk=2) == pytest.approx(expected)


@torch.no_grad()
def _mtp_vs_trunk(model, tokens):
    """Cross-entropy of each depth's drafts against the trunk's distribution, summed over depths."""
    t = tokens.shape[1]
    pos = torch.arange(t)[None]
    out = model(tokens, pos)
    target, hidden, total = F.softmax(out.logits, -1), out.hidden, 0.0
    for k in range(len(model.mtp)):
        n = t - k - 1
        o = model.mtp_forward(k, tokens[:, k + 1 :], hidden[:, :n], pos[:, k + 1 :])
        total += F.cross_entropy(o.logits[0], target[0, k + 1 :]).item()
        hidden = o.hidden
    return total


def test_mtp_modules_share_embedding_and_head():
    from nextn.testing import tiny_config

    model = build_model(tiny_config(), seed=0)
    for m in model.mtp:
        assert m.embed_tokens is model.model.embed_tokens and m.shared_head.head is model.lm_head
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith("mtp.") and ("embed_tokens" in n or "shared_head.head" in n) for n in names)
    assert math.isclose(model.lm_head.weight.std().item(), 0.02, rel_tol=0.2)


@pytest.mark.slow
def test_train_command_both_stages_and_from(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from nextn.train.__main__ import main

    args = ["--preset", "tiny", "--max-files", "12", "--vocab", "300", "--steps", "3"]
    r = CliRunner().invoke(main, [str(tmp_path / "a"), *args, "--distill-steps", "0"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [str(tmp_path / "b"), *args, "--distill-steps", "2", "--from", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    info_a = json.loads((tmp_path / "a" / "training.json").read_text())
    info_b = json.loads((tmp_path / "b" / "training.json").read_text())
    assert info_b["distill"]["steps"] == 2 and "distill" not in info_a
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    layers = 3  # tiny preset: MTP modules at model.layers.3 and .4
    trunk = [n for n in a if not any(n.startswith(f"model.layers.{layers + k}.") for k in range(2))]
    assert all(torch.equal(a[n], b[n]) for n in trunk)
    assert any(not torch.equal(a[n], b[n]) for n in a if n.startswith(f"model.layers.{layers}."))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(p.name for p in (tmp_path / "a").iterdir())
    # a stage 2 from a distilled checkpoint keeps the earlier record, numbered
    r = CliRunner().invoke(main, [str(tmp_path / "c"), *args, "--distill-steps", "1", "--from", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    info_c = json.loads((tmp_path / "c" / "training.json").read_text())
    assert info_c["distill_0"] == info_b["distill"] and info_c["distill"]["steps"] == 1


@pytest.mark.parametrize("device", ["bogus", "cuda:7"])
def test_train_command_refuses_a_device_it_cannot_use(tmp_path, device):
    from click.testing import CliRunner

    from nextn.train.__main__ import main

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    r = CliRunner().invoke(main, [str(tmp_path / "out"), "--preset", "tiny", "--device", device])
    assert r.exit_code == 2 and "--device" in r.output and device in r.output and r.exception is not None
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()
