"""Draft-and-verify decoding: lossless greedy, exact rollback, MTP caches, sampling distribution, stops."""

import json

import numpy as np
import pytest
import torch
from hf_reference import load_hf

import nextn
from nextn.errors import NextnError
from nextn.runtime import decoder as decoder_module
from nextn.runtime.engines import Engine
from nextn.runtime.sampling import SamplingParams, accept_drafts, target_probs

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, "auto"])
@torch.no_grad()
def test_greedy_equals_transformers_generate(hf_artifact, k):
    """Batch 1 and a batch of 3: every K, and the controller's per-step K, give transformers' own greedy tokens."""
    checkpoint, artifact = hf_artifact
    main, _ = load_hf(checkpoint)
    seed = 5 if k == "auto" else k
    prompts = torch.randint(2, main.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(seed))
    want = main.generate(prompts, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 6:]
    with nextn.load(artifact) as model:
        model.eos_ids = ()  # transformers runs with eos_token_id=None: compare all 12 tokens
        one = model.generate(prompts[0].tolist(), max_new_tokens=12, draft=k)
        assert one.token_ids == want[0].tolist()
        batch = model.generate([p.tolist() for p in prompts], max_new_tokens=12, draft=k)
        assert [r.token_ids for r in batch] == want.tolist()
        if k != "auto":
            assert (batch[0].stats["drafted"] == 0) == (k == 0)
        else:  # the first step of an artifact never drafted on tries every position
            assert one.stats["draft"] == "auto" and one.stats["step_draft"][0] == model.decoder.max_draft
            assert sum(one.stats["draft_histogram"].values()) == one.stats["steps"]


class Oracle(Engine):
    """Wraps a real MTP engine (its caches evolve as usual) but makes its draft the true greedy next
    token whenever `right(position)` says so, and a wrong token otherwise."""

    def __init__(self, inner, truth: list[int], right):
        super().__init__(inner.name, inner.inputs, inner.outputs)
        self.inner, self.truth, self.right = inner, truth, right

    def run(self, feed, out=None):
        out = self.inner.run(feed, out)
        logits = out[0].copy()
        pos = int(feed["position_ids"][0, -1])  # position of the embedded token; the draft is for pos + 1
        if pos + 1 < len(self.truth):
            want = self.truth[pos + 1]
            tok = want if self.right(pos + 1) else (want + 1) % logits.shape[-1]
            logits[0, -1] = -1e9
            logits[0, -1, tok] = 1e9
        return [logits, *out[1:]]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_rollback_keeps_output_exact_and_counts_acceptance(tiny_artifact, k):
    with nextn.load(tiny_artifact) as model:
        prompt = [5, 9, 13, 17, 21]
        plain = model.generate(prompt, max_new_tokens=30).token_ids
        truth = prompt + plain
        real = {n: e for n, e in model.engines.items() if n.startswith("mtp_")}
        for right, expect_all in [(lambda p: True, True), (lambda p: p % 3 != 0, False)]:
            for name, e in real.items():
                model.engines[name] = Oracle(e, truth, right)
            got = model.generate(prompt, max_new_tokens=30, draft=k)
            assert got.token_ids == plain  # forced rejections never change the output
            s = got.stats
            assert s["accepted"] <= s["drafted"] and s["steps"] >= 1
            if expect_all:  # every draft right: K+1 tokens per verify step
                assert s["accepted"] == s["drafted"]
                assert s["mean_acceptance_length"] == pytest.approx(1 + s["drafted"] / s["steps"])
            else:
                assert 0 < s["accepted"] < s["drafted"]
        for name, e in real.items():
            model.engines[name] = e


def test_mtp_caches_match_the_accepted_sequence(tiny_artifact, tiny_checkpoint, monkeypatch):
    """After generation, every exact MTP cache slot equals a fresh computation over the final sequence."""
    from nextn.model.weights import load_model

    states = []
    original = decoder_module._State.__init__

    def capture(self, *a, **kw):
        original(self, *a, **kw)
        states.append(self)

    monkeypatch.setattr(decoder_module._State, "__init__", capture)
    with nextn.load(tiny_artifact) as model:
        prompt = [3, 1, 4, 1, 5, 9, 2, 6]
        plain = model.generate(prompt, max_new_tokens=20).token_ids
        truth = prompt + plain
        real = {n: e for n, e in model.engines.items() if n.startswith("mtp_")}
        for name, e in real.items():
            model.engines[name] = Oracle(e, truth, lambda p: p % 4 != 1)
        model.generate(prompt, max_new_tokens=20, draft=3)
    st = states[-1]
    ref, _ = load_model(model.engines.manifest["source"])
    ids = torch.tensor([st.tokens])
    n = st.n
    with torch.no_grad():
        hidden = ref(ids[:, :n], torch.arange(n)[None]).hidden
        for k in range(2):
            valid = st.mtp_valid[k]
            pos = torch.arange(valid)[None] + k + 1
            out = ref.mtp_forward(k, ids[:, k + 1 : valid + k + 1], hidden[:, :valid], pos)
            assert np.abs(st.mtp_c[k][0, :valid] - out.new_kv.c_kv[0].numpy()).max() < 1e-4
            if k == 0:  # the last module (k = 1) outputs its last slot only: nothing reads its hidden_out
                assert np.abs(st.mtp_hidden[k][:valid] - out.hidden[0].numpy()).max() < 1e-4
            hidden = out.hidden


def test_rejection_sampling_keeps_the_target_distribution():
    """Point-mass drafts, accepted with probability p(d): the first emitted token is distributed as p."""
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    params = SamplingParams(temperature=1.0, seed=0)
    p = target_probs(logits, params)
    for draft in (0, 1, 3):
        counts = np.zeros(4)
        accepted = 0
        n = 40000
        for _ in range(n):
            a, tok = accept_drafts(logits, [draft], params, rng)
            counts[draft if a == 1 else tok] += 1
            accepted += a
        chi2 = (((counts - n * p[0]) ** 2) / (n * p[0])).sum()
        assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001
        assert abs(accepted / n - p[0, draft]) < 0.01


@pytest.mark.parametrize("draft", [1, "auto"])
def test_sampled_generation_matches_plain_sampling_distribution(tiny_artifact, draft):
    """Two sampled tokens with drafting (an oracle drafting the argmax, so drafts are often accepted and
    sometimes rejected) follow the exact joint distribution computed from the reference. At auto the
    controller decides per step from what earlier steps accepted (step costs set so that drafting pays)."""
    from nextn.model.weights import load_model
    from nextn.runtime.costs import BatchCosts, CostModel

    params = dict(temperature=0.8, top_k=3)
    prompt = [7, 8, 9]
    with nextn.load(tiny_artifact) as model:
        if draft == "auto":
            model.decoder._costs = CostModel(None, model.decoder.max_draft)
            # a plain step "costs" 1e6 ms, so no real step reads dearer than these ratios and they stay put
            model.decoder._costs.batches[1] = BatchCosts(1e6, [1.0, 1.2, 1.4, 1.6, 1.8], [], 0.0, 0.0)
        ref, _ = load_model(model.engines.manifest["source"])
        sp = SamplingParams(**params)
        with torch.no_grad():
            p1 = target_probs(ref(torch.tensor([prompt]), torch.arange(3)[None]).logits[0, -1:].numpy(), sp)[0]
            joint = {}
            for t1 in np.nonzero(p1)[0]:
                ids = torch.tensor([prompt + [int(t1)]])
                p2 = target_probs(ref(ids, torch.arange(4)[None]).logits[0, -1:].numpy(), sp)[0]
                for t2 in np.nonzero(p2)[0]:
                    joint[(int(t1), int(t2))] = p1[t1] * p2[t2]
        greedy2 = {t1: int(np.argmax(target_probs(ref(torch.tensor([prompt + [t1]]), torch.arange(4)[None])
                                                  .logits[0, -1:].detach().numpy(), sp)[0])) for t1 in range(256)
                   if p1[t1] > 0}  # fmt: skip

        class ArgmaxDraft(Engine):
            def __init__(self, inner):
                super().__init__(inner.name, inner.inputs, inner.outputs)
                self.inner = inner

            def run(self, feed, out=None):
                out = self.inner.run(feed, out)
                logits = out[0].copy()
                t1 = int(feed["input_ids"][0, -1])
                if t1 in greedy2:
                    logits[0, -1] = -1e9
                    logits[0, -1, greedy2[t1]] = 1e9
                return [logits, *out[1:]]

        model.engines["mtp_0"] = ArgmaxDraft(model.engines["mtp_0"])
        n = 3000
        counts: dict = {}
        accepted = 0
        for seed in range(n):
            r = model.generate(prompt, max_new_tokens=2, draft=draft, seed=seed, **params)
            key = tuple(r.token_ids)
            counts[key] = counts.get(key, 0) + 1
            accepted += r.stats["accepted"]
    assert set(counts) <= set(joint)
    chi2 = sum((counts.get(k, 0) - n * q) ** 2 / (n * q) for k, q in joint.items())
    dof = len(joint) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5  # ~ p < 1e-4 for these degrees of freedom
    assert 0.2 * n < accepted < n  # both paths exercised


def test_stop_conditions_and_contract(tiny_artifact):
    with nextn.load(tiny_artifact) as model:
        prompt = "w5 w6 w7"
        full = model.generate(prompt, max_new_tokens=12, draft=2)
        assert full.text == model.tokenizer.decode(full.token_ids) and len(full.token_ids) == 12
        # EOS: stop right after the first occurrence of a token the model emits
        model.eos_ids = (full.token_ids[4],)
        eos = model.generate(prompt, max_new_tokens=12, draft=2)
        first = full.token_ids.index(full.token_ids[4])
        assert eos.token_ids == full.token_ids[: first + 1]
        model.eos_ids = ()
        # stop string: the text is cut where the string first appears
        word = model.tokenizer.decode([full.token_ids[6]])
        cut = model.generate(prompt, max_new_tokens=12, draft=2, stop=[word])
        assert cut.token_ids == full.token_ids[: full.token_ids.index(full.token_ids[6]) + 1]
        # streaming yields the same tokens
        pieces = list(model.generate(prompt, max_new_tokens=12, draft=2, stream=True))
        assert [t for p in pieces for t in p.token_ids] == full.token_ids
        s = full.stats
        assert set(s) >= {"ttft_ms", "tpot_ms", "tokens_per_s", "steps", "drafted", "accepted",
                          "accepted_per_position", "mean_acceptance_length", "time_ms"}  # fmt: skip
        assert len(s["accepted_per_position"]) == 2
        with pytest.raises(NextnError, match="does not fit the context"):
            model.generate([1] * 1024, max_new_tokens=2)
        with pytest.raises(NextnError, match="outside the vocabulary"):
            model.generate([1, 999], max_new_tokens=2)
        with pytest.raises(NextnError, match="--temperature"):
            model.generate([1, 2], temperature=-1)


def test_torch_backend_matches_ort(tiny_artifact):
    with nextn.load(tiny_artifact, backend="torch") as t, nextn.load(tiny_artifact) as o:
        for k in (0, 2):
            assert t.generate([4, 5, 6], max_new_tokens=10, draft=k).token_ids == \
                o.generate([4, 5, 6], max_new_tokens=10, draft=k).token_ids


def test_cli_run_json_and_errors(tiny_artifact, tmp_path):
    import shutil
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "nextn.cli", "run", *args], capture_output=True, text=True)

    r = run(str(tiny_artifact), "--prompt", "w1 w2 w3", "--max-new-tokens", "6", "--draft", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 6 and out["text"].startswith("w")
    assert set(out["stats"]) >= {"ttft_ms", "tpot_ms", "tokens_per_s", "steps", "drafted", "accepted",
                                 "accepted_per_position", "mean_acceptance_length"}  # fmt: skip
    r = run(str(tiny_artifact), "--prompt", "w1 w2 w3", "--max-new-tokens", "4")
    assert r.returncode == 0 and r.stdout.strip().startswith("w") and "tok/s" in r.stderr
    bad = shutil.copytree(tiny_artifact, tmp_path / "bad")
    data = bytearray((bad / "weights.bin").read_bytes())
    data[100] ^= 1
    (bad / "weights.bin").write_bytes(bytes(data))
    for args, message in [
        ((str(bad), "--prompt-ids", "1,2"), "sha256 mismatch"),
        ((str(tmp_path / "none"), "--prompt-ids", "1,2"), "not an artifact folder"),
        ((str(tiny_artifact), "--prompt-ids", "1,2", "--backend", "trt"), "--backend trt"),
        ((str(tiny_artifact), "--prompt-ids", "1,2", "--device", "cuda"), "--device cuda"),
        ((str(tiny_artifact), "--prompt-ids", "1,2", "--top-p", "1.5"), "--top-p 1.5"),
        ((str(tiny_artifact), "--prompt-ids", "1,2", "--draft", "-1"), "--draft -1"),
    ]:
        r = run(*args)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


def test_ragged_batch_equals_each_sequence_alone(tiny_artifact, monkeypatch):
    """Different prompt lengths and per-sequence acceptance in one batch: every row is what it is alone."""
    with nextn.load(tiny_artifact) as model:
        model.eos_ids = ()
        prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19], [20]]
        for k in (0, 2, 3):  # real MTP drafts
            alone = [model.generate(p, max_new_tokens=16, draft=k).token_ids for p in prompts]
            assert [r.token_ids for r in model.generate(prompts, max_new_tokens=16, draft=k)] == alone
        sampled = dict(temperature=0.9, top_p=0.9, seed=4)
        alone_s = [model.generate(p, max_new_tokens=10, draft=2, **sampled).token_ids for p in prompts]
        assert [r.token_ids for r in model.generate(prompts, max_new_tokens=10, draft=2, **sampled)] == alone_s

        # Drafts right at some positions only (different per row): forced rejections in a shared pass.
        truth = {tuple(p): p + a for p, a in zip(prompts, alone)}

        def partly_right(st, k, stats):  # row i drafts right at about (i + 1) / 5 of the positions
            i, seq = next((i, v) for i, (key, v) in enumerate(truth.items()) if tuple(st.tokens[: len(key)]) == key)
            n = st.n
            return [seq[n + 1 + j] if (7 * (n + j) + 3) % 5 <= i and n + 1 + j < len(seq) else 0 for j in range(k)]

        monkeypatch.setattr(model.decoder, "draft", partly_right)
        for k in (1, 3):
            batch = model.generate(prompts, max_new_tokens=16, draft=k)
            single = [model.generate(p, max_new_tokens=16, draft=k) for p in prompts]
            assert [r.token_ids for r in batch] == [r.token_ids for r in single] == alone
            accepted = [r.stats["accepted"] for r in batch]
            assert accepted == [r.stats["accepted"] for r in single]
            assert sum(accepted) > 0 and len(set(accepted)) > 1  # rows accepted differently


def test_a_sequences_first_decode_steps_tell_no_cost(tiny_artifact):
    """Just after a prefill the CPU caches are cold (the embedded model's first plain steps: 1.2-1.5 ms against
    0.8-0.9): decoder.steady counts none of a sequence's first SETTLE_STEPS decode steps."""
    with nextn.load(tiny_artifact) as model:
        dec = model.decoder
        st = decoder_module._State(dec, 16)
        got = [dec.steady(st, 0) for _ in range(decoder_module.SETTLE_STEPS + 2)]
        assert got == [False] * decoder_module.SETTLE_STEPS + [True, True]
        st.reset()  # another sequence: cold again
        assert not dec.steady(st, 0) and not dec.steady(st, 0)
