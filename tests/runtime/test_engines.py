"""Engines: one interface per backend, weights mapped once for all sessions, outputs bound in place."""

import gc

import numpy as np
import pytest

from nextn.runtime.engines import open_engines

pytestmark = pytest.mark.slow


def _feed(manifest, b=1, s=2):
    c = manifest["config"]
    feed = {"input_ids": np.array([[3, 4]] * b), "position_ids": np.array([[0, 1]] * b),
            "attention_mask": np.ones((b, s), np.int64)}  # fmt: skip
    for i in range(c["num_hidden_layers"]):
        feed[f"past.{i}.c_kv"] = np.zeros((b, 0, c["kv_lora_rank"]), np.float32)
        feed[f"past.{i}.k_pe"] = np.zeros((b, 0, c["qk_rope_head_dim"]), np.float32)
    return feed


def test_backends_agree_and_bind_outputs_in_place(tiny_artifact):
    with open_engines(tiny_artifact) as ort_engines, open_engines(tiny_artifact, backend="torch") as torch_engines:
        gc.collect()  # the sessions borrow the shared mapping: it must outlive open_engines' locals
        feed = _feed(ort_engines.manifest)
        a = ort_engines["trunk"].run(feed)
        b = torch_engines["trunk"].run(feed)
        assert all(np.abs(x - y).max() < 1e-4 for x, y in zip(a, b))
        cache = np.full((1, 5, ort_engines.manifest["config"]["kv_lora_rank"]), 7.0, np.float32)
        out = ort_engines["trunk"].run(feed, {"new.0.c_kv": cache[:, 1:3]})
        assert out[2].base is not None and np.array_equal(cache[:, 1:3], a[2])  # written into the slice
        assert (cache[:, [0, 3, 4]] == 7.0).all()  # and nowhere else


def test_weights_are_mapped_once_for_all_graphs(tiny_artifact):
    with open_engines(tiny_artifact) as engines:
        shared = {id(e.shared) for e in engines.values()}
        assert len(shared) == 1  # one mapping of weights.bin for every session
        mapping = engines["trunk"].shared
        w = engines.manifest["weights"]
        # one OrtValue per stored tensor, however many graphs reference it
        assert len(mapping.values) <= w["tensors"] < w["references"]
        assert all(arr.base is not None for arr, _ in mapping.values.values())  # views, not copies


def test_drafts_run_on_one_thread_whatever_the_trunk_takes(tiny_artifact):
    # Two multi-thread pools spinning side by side oversubscribe the cores: drafting at 2 threads lost to plain
    # decoding on 2 cores (BENCHMARKS.md); the MTP graphs' sessions take one thread, the trunk what is asked.
    with open_engines(tiny_artifact, threads=2) as engines:
        threads = {n: e.session.get_session_options().intra_op_num_threads for n, e in engines.items()}
        assert threads == {"trunk": 2, "mtp_0": 1, "mtp_1": 1}
        assert engines.setup["threads"] == 2 and engines.setup["draft_threads"] == 1  # the step costs' key


def test_negative_threads_are_refused(tiny_artifact):
    from nextn.errors import NextnError

    with pytest.raises(NextnError, match="--threads -1: must be >= 0"):
        open_engines(tiny_artifact, threads=-1)


def test_prepacking_is_automatic_for_weights_that_are_a_small_share_of_memory():
    from nextn.runtime.engines import auto_prepack

    assert auto_prepack(40 << 20)  # the embedded model
    assert not auto_prepack(1 << 50)


def test_a_quantized_artifact_prepacks_up_to_half_of_memory():
    """Unpacked, ONNX Runtime's MatMulNBits and QMoE dequantize every weight at every call (the 1 GB int4
    trunk ran 40x slower), so a quantized artifact too large for the fp32 rule still pre-packs."""
    import os

    from nextn.runtime.engines import auto_prepack

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert not auto_prepack(ram // 4)
    assert auto_prepack(ram // 4, quantized=True)
    assert not auto_prepack(ram, quantized=True)  # larger than memory can hold twice over: mapped, unpacked


def _resident_kib(array: np.ndarray) -> int:
    """Resident KiB of the mapping that holds `array` (its region in /proc/self/smaps)."""
    address, inside = array.ctypes.data, False
    for line in open("/proc/self/smaps"):
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:  # a region's first line: start-end perms offset dev inode path
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError("no mapping holds the array")


def test_prepacked_sessions_do_not_keep_the_originals_resident(tiny_artifact):
    """Pre-packing reads every packed weight once: its pages of the shared mapping are dropped while the
    sessions open (otherwise they stay resident beside the packed copies), and the output is unchanged."""
    with open_engines(tiny_artifact, prepack=False) as plain:
        feed = _feed(plain.manifest)
        want = plain["trunk"].run(feed)
        touched = _resident_kib(plain["trunk"].shared.map)
    with open_engines(tiny_artifact, prepack=True) as packed:
        assert _resident_kib(packed["trunk"].shared.map) < touched / 4, (_resident_kib(packed["trunk"].shared.map), touched)
        got = packed["trunk"].run(feed)
        assert all(np.abs(x - y).max() < 1e-5 for x, y in zip(got, want))


def test_sessions_that_prepack_take_the_load_forms_and_compute_the_same(tiny_artifact):
    # Experts in halves and sibling products merged (runtime/expert_halves.py, merged_matmuls.py): the same
    # outputs as the graph as exported.
    from nextn.runtime.engines import OrtEngine

    with open_engines(tiny_artifact, threads=2, prepack=True) as engines:
        trunk = engines["trunk"]
        assert all(e.halves and e.merged for e in engines.values())  # every graph: a fused MoE, q_a beside kv_a
        whole = OrtEngine("trunk", trunk.inputs, trunk.outputs, tiny_artifact / "trunk.onnx", "cpu", 2, trunk.shared)
        feed = _feed(engines.manifest)
        for got, want in zip(trunk.run(feed), whole.run(feed)):
            assert np.abs(got - want).max() < 1e-5
    with open_engines(tiny_artifact, prepack=False) as engines:
        assert not engines["trunk"].halves and not engines["trunk"].merged  # no private copies: the mapping only
