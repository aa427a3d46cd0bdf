"""The step engine: sequences join, leave and are cancelled between steps; each one's output is what it
is decoded alone; a long prompt is prefilled in chunks without stalling the running sequences."""

import pytest

import nextn
from nextn.runtime.costs import cost_batch
from nextn.runtime.engine import Request, StepEngine
from nextn.runtime.sampling import SamplingParams

pytestmark = pytest.mark.slow


def _run(engine, seqs):
    """Step until every sequence in `seqs` has finished; -> tokens each got from take(), per step."""
    got = {id(s): [] for s in seqs}
    while not all(s.finished for s in seqs):
        for s in engine.step():
            if id(s) in got:
                got[id(s)] += s.take()
    return [got[id(s)] for s in seqs]


@pytest.mark.parametrize("draft", [0, 2, "auto"])
def test_sequences_joining_midway_equal_their_solo_runs(tiny_artifact, draft):
    with nextn.load(tiny_artifact) as model:
        dec = model.decoder
        prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19], [20]]
        alone = [dec.generate(p, 20, draft=draft)[0] for p in prompts]
        engine = StepEngine(dec, max_batch=8)
        first = engine.add(Request(prompts[0], 20, draft))
        for _ in range(3):
            engine.step()
        later = [engine.add(Request(p, 20, draft)) for p in prompts[1:3]]
        engine.step()
        last = engine.add(Request(prompts[3], 20, draft))
        seqs = [first, *later, last]
        _run(engine, seqs)
        assert [s.final() for s in seqs] == alone
        assert all(s.finish_reason == "length" for s in seqs) and not engine.has_work


def test_mixed_draft_settings_and_sampling_in_one_batch(tiny_artifact):
    """Rows with different fixed K, auto, and sampled rows share passes; each equals its solo run."""
    with nextn.load(tiny_artifact) as model:
        dec = model.decoder
        sampled = SamplingParams(0.8, 0, 0.9, seed=3)
        reqs = [Request([5, 6, 7], 16, 0), Request([8, 9], 16, 3), Request([10, 11, 12, 13], 16, "auto"),
                Request([14, 15], 16, 2, sampled)]  # fmt: skip
        alone = [dec.generate(r.prompt, r.max_new_tokens, r.draft, r.params)[0] for r in reqs]
        engine = StepEngine(dec, max_batch=4)
        seqs = [engine.add(r) for r in reqs]
        streamed = _run(engine, seqs)
        assert [s.final() for s in seqs] == alone == streamed
        assert [s.stats.steps < 16 for s in seqs][1]  # the K = 3 row accepted drafts


def test_cancel_frees_the_slot_and_its_caches_are_reused(tiny_artifact):
    with nextn.load(tiny_artifact) as model:
        dec = model.decoder
        want = dec.generate([9, 8, 7], 12, draft=2)[0]
        engine = StepEngine(dec, max_batch=1)
        a = engine.add(Request([1, 2, 3], 500, 2))
        b = engine.add(Request([9, 8, 7], 12, 2))
        engine.step()
        engine.step()
        assert b.state is None and len(engine.queued) == 1  # one slot: b waits
        caches = a.state
        engine.cancel(a)
        assert a.finish_reason == "cancelled" and a.stats.new_tokens == len(a.final()) < 500
        engine.step()
        assert b.state is caches  # a's caches, reset, serve b
        _run(engine, [b])
        assert b.final() == want and b.finish_reason == "length"


def test_long_prompt_is_prefilled_in_chunks_without_stalling_the_batch(tiny_artifact):
    with nextn.load(tiny_artifact) as model:
        dec = model.decoder
        long_prompt = [(7 * i) % 200 + 2 for i in range(40)]
        want_long = dec.generate(long_prompt, 8, draft=2)[0]
        want_short = dec.generate([4, 5], 30, draft=0)[0]
        engine = StepEngine(dec, max_batch=4, prefill_chunk=8)
        short = engine.add(Request([4, 5], 30, 0))
        engine.step()
        long = engine.add(Request(long_prompt, 8, 2))
        steps_prefilling = 0
        while not long.new:
            before = len(short.new)
            engine.step()
            steps_prefilling += 1
            assert len(short.new) == before + 1  # the running sequence got its token in every step
        assert steps_prefilling == 5  # 40 prompt tokens, 8 per step
        _run(engine, [short, long])
        assert short.final() == want_short and long.final() == want_long


def test_stop_and_eos_finish_reasons(tiny_artifact):
    with nextn.load(tiny_artifact) as model:
        dec = model.decoder
        full = dec.generate([5, 6, 7], 12, draft=2)[0]
        engine = StepEngine(dec)
        eos = engine.add(Request([5, 6, 7], 12, 2, eos_ids=(full[3],)))
        length = engine.add(Request([5, 6, 7], 12, 2))
        _run(engine, [eos, length])
        assert eos.final() == full[: full.index(full[3]) + 1] and eos.finish_reason == "stop"
        assert length.final() == full and length.finish_reason == "length"


def test_streaming_generator_is_thread_free_and_can_be_abandoned(tiny_artifact):
    import threading

    with nextn.load(tiny_artifact) as model:
        full = model.generate([5, 6, 7], max_new_tokens=30, draft=2)
        threads = threading.active_count()
        stream = model.generate([5, 6, 7], max_new_tokens=30, draft=2, stream=True)
        first = next(stream)
        assert threading.active_count() == threads and first.token_ids == full.token_ids[: len(first.token_ids)]
        stream.close()  # abandoning it cancels the sequence (no thread left decoding)
        pieces = list(model.generate([5, 6, 7], max_new_tokens=30, draft=2, stream=True))
        assert [t for p in pieces for t in p.token_ids] == full.token_ids
        assert pieces[-1].finish_reason == "length" and pieces[-1].stats["new_tokens"] == 30


def test_plain_steps_at_a_fixed_k_keep_the_level_current(tiny_artifact):
    """Once draft="auto" has opened the step costs, plain decoding at a fixed K = 0 measures the level too (a
    bench's K = 0 rounds between its auto rounds, a server's plain requests): after drafting, a stale level, here
    ~1000x what a step costs, is replaced. Plain decoding alone opens no costs (it would start a calibration)."""
    with nextn.load(tiny_artifact) as model:
        dec = model.decoder
        dec.generate([5, 6, 7], 12, draft=0)
        assert not dec.has_costs
        dec.generate([5, 6, 7], 12, draft="auto")
        model = dec.costs()
        costs = model.at(1)
        model.observe(1, 1, 2000.0)  # a drafting step, as auto's rows report it, over a stale level
        costs.level = 1000.0
        dec.generate([5, 6, 7], 20, draft=0)  # its first counted plain steps replace the level
        assert costs.level < 10.0 and costs.measured


def test_cost_batch_sizes():
    assert [cost_batch(b) for b in (1, 2, 3, 4, 5, 7, 8, 15, 16, 64)] == [1, 2, 3, 4, 4, 4, 8, 8, 16, 64]
