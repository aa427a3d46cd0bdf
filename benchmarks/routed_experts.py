"""nextn's routed-experts kernel (runtime/routed_experts.py) against ONNX Runtime's fp32 MoE.

    python benchmarks/routed_experts.py [--artifact DIR] [--rounds 9] [--iters 40] [--threads 1,2] [--past 100]

1. The op alone: 8 MoE layers of the embedded sizes (E 8, H 256, I 96, top 2; random weights, fresh routing
   every call), as com.microsoft.MoE and as nextn.RoutedExperts, at 1, 2, 4 and 8 rows, at each --threads.
2. The trunk of an artifact (default: the embedded model's) opened with the kernel ("kernel") and without it
   ("moe": what a machine without a C compiler runs), at 1, 2 and 4 new tokens after a random past, each pass
   preceded by an MTP call as in decoding; the two alternate within each round. Prints medians, kernel / moe
   (median of per-round ratios), each form's 4-token / 1-token cost, and the largest logit difference.
3. Decoding (`--decode`): greedy TPOT at K = 0 and `auto` with each form, the runtime's default threads,
   held-out prompts, the four runs alternating per prompt; tokens must be identical across all four.
"""

import argparse
import statistics
import time
from unittest import mock

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nextn.calib.rewrite import MS_DOMAIN
from nextn.export import io
from nextn.runtime import native, routed_experts
from nextn.runtime.engines import open_engines

E, H, I, K, LAYERS = 8, 256, 96, 2, 8


def op_graphs(rng) -> dict[str, bytes]:
    """The same 8 layers of experts as MoE nodes and as RoutedExperts nodes, each layer reading x."""
    stacks = [((rng.standard_normal((E, 2 * I, H)) * 0.05).astype(np.float32),
               (rng.standard_normal((E, H, I)) * 0.05).astype(np.float32)) for _ in range(LAYERS)]  # fmt: skip
    graphs = {}
    for form in ("moe", "kernel"):
        nodes, inits = [], []
        for i, (fc1, fc2) in enumerate(stacks):
            if form == "moe":
                nodes.append(helper.make_node("MoE", ["x", "rp", f"fc1_{i}", "", f"fc2_{i}"], [f"y{i}"], domain=MS_DOMAIN,
                                              k=K, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                                              activation_beta=0.0, normalize_routing_weights=0))  # fmt: skip
            else:
                fc1, fc2 = routed_experts.transposed_stacks(fc1, fc2)
                nodes.append(helper.make_node(routed_experts.OP_TYPE, ["x", "rp", f"fc1_{i}", f"fc2_{i}"], [f"y{i}"],
                                              domain=native.DOMAIN, k=K, normalize_routing_weights=0))  # fmt: skip
            inits += [numpy_helper.from_array(fc1, f"fc1_{i}"), numpy_helper.from_array(fc2, f"fc2_{i}")]
        g = helper.make_graph(nodes, form, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", H]),
                                            helper.make_tensor_value_info("rp", TensorProto.FLOAT, ["n", E])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["n", H]) for i in range(LAYERS)],
                              initializer=inits)  # fmt: skip
        ops = [helper.make_opsetid("", 23), helper.make_opsetid(MS_DOMAIN, 1), helper.make_opsetid(native.DOMAIN, 1)]
        graphs[form] = helper.make_model(g, opset_imports=ops).SerializeToString()
    return graphs


def op_alone(rounds: int, iters: int, threads: int) -> None:
    rng = np.random.default_rng(0)
    sessions = {}
    for form, graph in op_graphs(rng).items():
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = threads, 3
        so.register_custom_ops_library(str(native.kernel_library()))
        sessions[form] = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])

    def feed(n):
        rp = np.full((n, E), -np.inf, np.float32)
        for t in range(n):
            rp[t, rng.choice(E, K, replace=False)] = np.log(rng.uniform(0.1, 1.0, K))
        return {"x": rng.standard_normal((n, H)).astype(np.float32), "rp": rp}

    print(f"1. {LAYERS} routed-expert layers alone (E {E}, H {H}, I {I}, top {K}), {threads} thread(s), us per call")
    for n in (1, 2, 4, 8):
        f = feed(n)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(sessions["moe"].run(None, f), sessions["kernel"].run(None, f)))
        us = {form: [] for form in sessions}
        for r in range(rounds):
            for form in sessions if r % 2 == 0 else reversed(list(sessions)):
                feeds = [feed(n) for _ in range(iters)]
                t0 = time.perf_counter()
                for f in feeds:
                    sessions[form].run(None, f)
                us[form].append((time.perf_counter() - t0) / iters * 1e6)
        ratio = statistics.median([b / a for a, b in zip(us["moe"], us["kernel"])])
        print(f"  {n} row(s): MoE {statistics.median(us['moe']):.0f}  kernel {statistics.median(us['kernel']):.0f}  "
              f"kernel / MoE {ratio:.3f}  max |diff| {diff:.1e}")


def open_both(artifact, threads):
    with mock.patch.object(native, "kernel_library", lambda: None):
        moe = open_engines(artifact, threads=threads)
    kernel = open_engines(artifact, threads=threads)
    assert getattr(kernel["trunk"], "routed_experts", 0) > 0, "the kernel did not apply (no C compiler?)"
    return {"moe": moe, "kernel": kernel}


def trunk_steps(artifact, threads: int, rounds: int, iters: int, past_len: int) -> None:
    engines = open_both(artifact, threads)
    cfg = engines["moe"].manifest["config"]
    rng = np.random.default_rng(1)
    pasts = [(rng.standard_normal((1, past_len, cfg["kv_lora_rank"]), dtype=np.float32),
              rng.standard_normal((1, past_len, cfg["qk_rope_head_dim"]), dtype=np.float32))
             for _ in range(cfg["num_hidden_layers"])]  # fmt: skip
    ms = {(f, s): [] for f in engines for s in (1, 2, 4)}
    diff = 0.0
    for r in range(rounds):
        for s in (1, 2, 4):
            ids = rng.integers(0, cfg["vocab_size"], (1, s))
            pos, mask = np.arange(past_len, past_len + s)[None], np.ones((1, past_len + s), np.int64)
            trunk = io.trunk_feed(ids, pos, mask, pasts)
            hidden = rng.standard_normal((1, 1, cfg["hidden_size"]), dtype=np.float32)
            mtp = io.mtp_feed(ids[:, :1], hidden, pos[:, :1], mask[:, : past_len + 1], *pasts[0])
            logits = {}
            for form in ("moe", "kernel") if r % 2 == 0 else ("kernel", "moe"):
                times = []
                for _ in range(iters):
                    engines[form]["mtp_0"].run(mtp)
                    t0 = time.perf_counter()
                    out = engines[form]["trunk"].run(trunk)
                    times.append(time.perf_counter() - t0)
                logits[form] = out[0]
                ms[form, s].append(statistics.median(times) * 1e3)
            diff = max(diff, float(np.abs(logits["moe"] - logits["kernel"]).max()))
    print(f"2. trunk of {artifact}, {threads} thread(s), past {past_len}, ms per pass")
    for s in (1, 2, 4):
        ratio = statistics.median([b / a for a, b in zip(ms["moe", s], ms["kernel", s])])
        print(f"  {s} new token(s): MoE {statistics.median(ms['moe', s]):.3f}  kernel {statistics.median(ms['kernel', s]):.3f}"
              f"  kernel / MoE {ratio:.3f}")
    for form in engines:
        print(f"  {form}: 4-token / 1-token {statistics.median(ms[form, 4]) / statistics.median(ms[form, 1]):.3f}")
    print(f"  max |logits diff| {diff:.1e}")
    for e in engines.values():
        e.close()


def decoding(artifact, prompts: int, gen_len: int) -> None:
    import nextn
    from nextn.bench.latency import load_prompts

    with mock.patch.object(native, "kernel_library", lambda: None):
        models = {"moe": nextn.load(artifact)}
    models["kernel"] = nextn.load(artifact)
    for m in models.values():
        m.eos_ids = ()
    tok = models["moe"]
    texts = load_prompts(None, tok.tokenizer, tok.engines.manifest["config"]["vocab_size"], 64, prompts)
    runs = [(form, draft) for draft in (0, "auto") for form in models]
    tpot = {r: [] for r in runs}
    for i, p in enumerate(texts * 2):
        tokens = set()
        for form, draft in runs if i % 2 == 0 else runs[::-1]:
            res = models[form].generate(p, max_new_tokens=gen_len, draft=draft)
            tpot[form, draft].append(res.stats["tpot_ms"])
            tokens.add(tuple(res.token_ids))
        assert len(tokens) == 1, "greedy tokens differ between the forms or drafts"
    print(f"3. decoding {len(texts)} held-out prompts x {gen_len} tokens, twice, default threads: median TPOT ms")
    for draft in (0, "auto"):
        a, b = tpot["moe", draft], tpot["kernel", draft]
        print(f"  K = {draft}: MoE {statistics.median(a):.3f}  kernel {statistics.median(b):.3f}  kernel / MoE "
              f"{statistics.median([y / x for x, y in zip(a, b)]):.3f}")
    for form in models:
        ratio = statistics.median([x / y for x, y in zip(tpot[form, 0], tpot[form, "auto"])])
        print(f"  {form}: auto speedup over K = 0 {ratio:.3f}x")
    for m in models.values():
        m.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", default=None, help="default: the embedded model's (drafts int4)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--past", type=int, default=100)
    ap.add_argument("--decode", action="store_true", help="also decode (part 3)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--skip-op", action="store_true")
    args = ap.parse_args()
    if native.kernel_library() is None:
        raise SystemExit("the kernel could not be built here (see the warning above)")
    if not args.skip_op:
        for t in (int(x) for x in args.threads.split(",") if x):
            op_alone(args.rounds, args.iters, t)
    if args.artifact is None:
        from nextn.embedded import embedded_default

        args.artifact = embedded_default()
    for t in (int(x) for x in args.threads.split(",") if x):
        trunk_steps(args.artifact, t, args.rounds, args.iters, args.past)
    if args.decode:
        decoding(args.artifact, args.prompts, args.gen_len)


if __name__ == "__main__":
    main()
