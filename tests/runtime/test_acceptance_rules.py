"""Relaxed acceptance (opt-in, lossy): the rule on made-up logits, refused without its flag, marked in
the stats and the CLI's output; exact acceptance stays the default."""

import json
import subprocess
import sys

import numpy as np
import pytest

import nextn
from nextn.errors import NextnError
from nextn.runtime.sampling import AcceptRule, SamplingParams, accept_drafts

GREEDY = SamplingParams()


def test_relaxed_rule_top_n_and_delta():
    rng = np.random.default_rng(0)
    row = np.array([3.0, 2.8, 2.0, 0.0])  # log-prob gaps to the top: 0, 0.2, 1.0, 3.0
    logits = np.stack([row, row, row])  # [K+1 = 3, V]
    exact = accept_drafts(logits, [1, 0], GREEDY, rng)
    assert exact == (0, 0)  # draft 1 is not the argmax
    rule = AcceptRule(True, top_n=2, delta=0.5)
    assert accept_drafts(logits, [1, 0], GREEDY, rng, rule) == (2, 0)  # 2nd-best within 0.5: accepted
    assert accept_drafts(logits, [2, 0], GREEDY, rng, rule) == (0, 0)  # 3rd: outside top 2
    assert accept_drafts(logits, [2, 0], GREEDY, rng, AcceptRule(True, 3, 0.5)) == (0, 0)  # gap 1.0 > delta
    assert accept_drafts(logits, [2, 0], GREEDY, rng, AcceptRule(True, 3, 1.0)) == (2, 0)


def test_relaxed_is_refused_unless_asked_and_for_sampling():
    with pytest.raises(NextnError, match="--accept relaxed"):
        AcceptRule(False, top_n=3).check(GREEDY)
    with pytest.raises(NextnError, match="greedy"):
        AcceptRule(True, 3, 0.5).check(SamplingParams(temperature=0.7))
    with pytest.raises(NextnError, match="--relaxed-top 0"):
        AcceptRule(True, 0, 0.5).check(GREEDY)
    assert AcceptRule().describe() == "exact" and "lossy" in AcceptRule(True, 3, 0.5).describe()


@pytest.mark.slow
def test_relaxed_generation_is_marked_and_accepts_at_least_as_much(tiny_artifact):
    with nextn.load(tiny_artifact) as model:
        model.eos_ids = ()
        exact = model.generate([5, 6, 7], max_new_tokens=24, draft=2)
        relaxed = model.generate([5, 6, 7], max_new_tokens=24, draft=2, accept="relaxed", relaxed_top=256,
                                 relaxed_delta=1e9)  # fmt: skip
        assert exact.stats["acceptance"] == "exact" and "lossy" in relaxed.stats["acceptance"]
        # random weights: exact acceptance is rare; a rule that takes any token accepts every draft
        assert relaxed.stats["accepted"] == relaxed.stats["drafted"] > exact.stats["accepted"]
        assert relaxed.token_ids != exact.token_ids  # lossy indeed
        with pytest.raises(NextnError, match="--accept"):
            model.generate([5, 6, 7], accept="loose")


@pytest.mark.slow
def test_cli_relaxed_flags(tiny_artifact):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "nextn.cli", "run", str(tiny_artifact), "--prompt-ids", "5,6,7",
                               "--max-new-tokens", "6", *args], capture_output=True, text=True)  # fmt: skip

    r = run("--relaxed-top", "3")
    assert r.returncode == 1 and "--accept relaxed" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run("--draft", "soon")
    assert r.returncode == 1 and "--draft 'soon'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("--accept", "relaxed", "--draft", "2")
    assert r.returncode == 0 and "lossy" in r.stderr and "output may differ" in r.stderr
    r = run("--accept", "relaxed", "--draft", "2", "--json")
    assert "lossy" in json.loads(r.stdout)["stats"]["acceptance"]
    r = run("--json")  # the default: draft auto, exact
    s = json.loads(r.stdout)["stats"]
    assert s["draft"] == "auto" and s["acceptance"] == "exact" and sum(s["draft_histogram"].values()) == s["steps"]
