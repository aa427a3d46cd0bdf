"""Model-size sweep: what drafting would buy on bigger models, from costs measured on this machine.

For each size a random DeepSeek-V3-proportioned checkpoint (`nextn.testing.deepseek_like`, one MTP
module) is written and exported once (cached in the sweep folder). With a past of P tokens we time,
in ONNX Runtime, engine calls alone (medians):

    t1       trunk, 1 new token            (a plain decode step)
    t(K+1)   trunk, K+1 new tokens         (a verify step)  -> verify cost  c_K = t(K+1) / t1
    tm       one MTP module, 1 new token   -> MTP cost      m   = tm / t1

A draft-and-verify step with K drafts runs K MTP calls and one verify and emits L(K) tokens on
average, L being the mean acceptance length. So the projected speedup over plain decoding is

    speedup(K) = L(K) / (c_K + K * m)

with L(K) measured on the embedded (trained) model, the only one whose acceptance means anything.
Host time is left out (measured at under 1% of a step). The embedded model itself is included as a
check: its projected speedup is set against its measured one.

The largest size's plain-decoding TPOT is also compared with the memory-bandwidth floor: the weight
bytes one decode step must read (all dense weights, the shared experts and the k routed experts
a token picks in each MoE layer, the head, one embedding row) over the measured copy bandwidth.

With `schemes` (int8, int4, fp8) each size is also quantized by `nextn calibrate` (cached beside its
export; calibration on seeded random token ids, int4 weights round-to-nearest: the weights are random,
so only speed means anything) and its plain-decoding TPOT is measured in the same run as the fp32 one,
alternating between the artifacts: speedup = fp32 TPOT / quantized TPOT.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from nextn.model.config import ModelConfig

log = logging.getLogger(__name__)

SIZES: dict[str, Callable[[], ModelConfig]] = {}


def _size(name: str, hidden: int, layers: int, vocab: int, experts: int) -> None:
    from nextn.testing import deepseek_like

    SIZES[name] = lambda: deepseek_like(hidden, layers, vocab=vocab, experts=experts, mtp=1)


_size("tiny", 64, 2, 1024, 8)  # for tests
_size("10m", 256, 4, 8192, 16)
_size("30m", 384, 6, 16384, 16)
_size("70m", 512, 8, 32000, 16)
_size("270m", 1024, 12, 32000, 16)
_size("1b", 2048, 12, 32000, 16)


def parameter_count(cfg: ModelConfig) -> dict:
    from nextn.model.weights import mtp_shapes, trunk_shapes

    trunk = sum(math.prod(s) for s in trunk_shapes(cfg).values())
    mtp = sum(math.prod(s) for s in mtp_shapes(cfg, 0).values())
    return {"trunk": trunk, "mtp_module": mtp, "total": trunk + mtp * cfg.num_nextn_predict_layers}


def decode_read_bytes(cfg: ModelConfig, itemsize: int = 4) -> int:
    """Weight bytes one single-token trunk step reads: routed experts count k / E, the embedding one row."""
    from nextn.model.weights import trunk_shapes

    total = 0.0
    for name, shape in trunk_shapes(cfg).items():
        n = math.prod(shape)
        if ".mlp.experts." in name:
            n *= cfg.num_experts_per_tok / cfg.n_routed_experts
        elif name.endswith("embed_tokens.weight"):
            n = cfg.hidden_size
        total += n
    return int(total * itemsize)


def _feed(specs: list[dict], s: int, p: int, rng: np.random.Generator, vocab: int) -> dict:
    dims = {"batch": 1, "new_tokens": s, "past_len": p, "total_len": p + s, "output_rows": s}
    feed = {}
    for spec in specs:
        shape = tuple(dims[d] if isinstance(d, str) else d for d in spec["shape"])
        if spec["name"] == "input_ids":
            feed[spec["name"]] = rng.integers(2, vocab, size=shape, dtype=np.int64)
        elif spec["name"] == "position_ids":
            feed[spec["name"]] = np.broadcast_to(np.arange(p, p + s, dtype=np.int64), shape).copy()
        elif spec["name"] == "output_rows":  # an MTP graph's: every row, as a draft's catch-up of module 0
            feed[spec["name"]] = np.broadcast_to(np.arange(s, dtype=np.int64), shape).copy()
        elif spec["name"] == "attention_mask":
            feed[spec["name"]] = np.ones(shape, np.int64)
        else:
            feed[spec["name"]] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
    return feed


def time_call(engine, feed: dict, repeats: int) -> float:
    """Median ms of `repeats` calls after one warm-up."""
    engine.run(feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.run(feed)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def step_costs(artifact: Path, past: int, max_draft: int, threads: int, repeats: int) -> dict:
    """t1, c_K for K = 1..max_draft, m (see the module docstring), in ONNX Runtime."""
    from nextn.runtime.engines import open_engines

    with open_engines(artifact, backend="ort", threads=threads, verify=False) as eng:
        m = eng.manifest
        vocab = m["config"]["vocab_size"]
        rng = np.random.default_rng(0)
        trunk_in = m["graphs"]["trunk"]["inputs"]
        t = {s: time_call(eng["trunk"], _feed(trunk_in, s, past, rng, vocab), repeats) for s in range(1, max_draft + 2)}
        tm = time_call(eng["mtp_0"], _feed(m["graphs"]["mtp_0"]["inputs"], 1, past, rng, vocab), repeats)
    return {"trunk_ms": t[1], "verify_cost": {k: t[k + 1] / t[1] for k in range(1, max_draft + 1)},
            "mtp_cost": tm / t[1], "mtp_ms": tm}  # fmt: skip


def project(costs: dict, acceptance_length: dict[int, float]) -> dict[int, float]:
    """speedup(K) = L(K) / (c_K + K m)."""
    return {k: acceptance_length[k] / (costs["verify_cost"][k] + k * costs["mtp_cost"])
            for k in acceptance_length if k in costs["verify_cost"]}  # fmt: skip


def prepare(name: str, root: Path, progress=None) -> Path:
    """The exported artifact of sweep size `name` under `root` (written once by this nextn version, then reused)."""
    import nextn
    from nextn.export.exporter import ExportOptions, export_checkpoint
    from nextn.export.manifest import MANIFEST, read_manifest
    from nextn.testing import write_random_checkpoint

    art = root / f"{name}-onnx"
    if (art / MANIFEST).is_file() and read_manifest(art, verify=False)["tools"].get("nextn") == nextn.__version__:
        return art  # an older version's export may have other graph forms: those are re-exported
    ckpt = root / f"{name}-ckpt"
    if not (ckpt / "config.json").is_file():
        write_random_checkpoint(ckpt, SIZES[name](), seed=0, shard_bytes=2**30)
    export_checkpoint(ckpt, art, ExportOptions(force=True), progress)
    return art


def prepare_quantized(name: str, scheme: str, fp32: Path, root: Path) -> Path:
    """The `scheme` artifact of sweep size `name` (written once, then reused)."""
    from nextn.calib.calibrate import CalibOptions, calibrate_artifact
    from nextn.export.manifest import MANIFEST

    art = root / f"{name}-{scheme}"
    if (art / MANIFEST).is_file():
        from nextn.export.manifest import read_manifest

        source = read_manifest(fp32, verify=False)["files"]["weights.bin"]["sha256"]
        if read_manifest(art, verify=False)["quantization"].get("source_weights_sha256") == source:
            return art  # quantized from this very export
    vocab = SIZES[name]().vocab_size
    data = root / f"{name}-calib.ids"
    rng = np.random.default_rng(0)
    data.write_text("\n".join(" ".join(map(str, rng.integers(2, vocab, 48))) for _ in range(6)) + "\n")
    opts = CalibOptions(scheme=scheme, weight_method="rtn", samples=4, seq_len=48, eval_samples=1, min_top1=0.0,
                        decode_report=False, force=True)  # fmt: skip
    calibrate_artifact(fp32, art, [data], [], opts)
    return art


def quantized_tpot(artifacts: dict[str, Path], prompt_len: int, gen_len: int, threads: int, rounds: int = 2) -> dict:
    """Plain-decoding TPOT of each artifact (best of `rounds`, measured alternately) -> {scheme: ms}."""
    best = {k: math.inf for k in artifacts}
    for _ in range(rounds):
        for k, art in artifacts.items():
            best[k] = min(best[k], plain_tpot(art, prompt_len, gen_len, threads))
    return best


def embedded_acceptance(artifact: Path, max_draft: int, prompt_len: int, gen_len: int, n_prompts: int,
                        threads: int, tick=None) -> dict:  # fmt: skip
    """Mean acceptance length L(K), acceptance per position and median TPOT per K on a trained artifact,
    one run per held-out prompt (summarized as `nextn bench` summarizes its runs)."""
    import nextn
    from nextn.bench.latency import load_prompts, summarize

    out = {"mean_acceptance_length": {}, "tpot_ms": {}, "accepted_per_position": {}}
    with nextn.load(artifact, threads=threads) as model:
        model.eos_ids = ()
        prompts = load_prompts(None, model.tokenizer, model.engines.manifest["config"]["vocab_size"], prompt_len,
                               n_prompts)  # fmt: skip
        model.generate(prompts[0], max_new_tokens=8, draft=1)  # warm-up
        for k in range(max_draft + 1):
            runs = []
            for p in prompts:
                runs.append([model.generate(p, max_new_tokens=gen_len, draft=k).stats])
                if tick:
                    tick()
            s = summarize(runs, k)
            out["mean_acceptance_length"][k] = s["mean_acceptance_length"]
            out["tpot_ms"][k] = s["tpot_ms"]["median"]
            out["accepted_per_position"][k] = s["accepted_per_position"]
    return out


def auto_vs_plain(artifact: Path, prompt_len: int, gen_len: int, threads: int, rounds: int = 12) -> dict:
    """draft="auto" against plain decoding from random prompts (a random-weight model: drafts are almost
    never accepted, and the controller must turn drafting off): per round one generation of each, which
    goes first alternating, so drift within a round favours neither; the geometric mean of the rounds'
    ratios with its standard error. Identical plain steps on this VM spread +-10-25% from one generation
    to the next: 5 rounds' median read 0.90x on the 70m model where 30 alternating rounds read 0.99x
    +- 2% (BENCHMARKS.md), so fewer rounds cannot tell a 3% overhead from noise."""
    import nextn
    from nextn.bench.latency import draft_histogram, load_prompts

    with nextn.load(artifact, threads=threads) as model:
        model.eos_ids = ()
        prompts = load_prompts(None, None, model.engines.manifest["config"]["vocab_size"], prompt_len, rounds)
        model.generate(prompts[0], max_new_tokens=4, draft="auto")  # warm-up (and the step-cost calibration)
        logs, autos = [], []
        for i, p in enumerate(prompts):
            tpot = {}
            for draft in (0, "auto") if i % 2 == 0 else ("auto", 0):
                stats = model.generate(p, max_new_tokens=gen_len, draft=draft).stats
                tpot[draft] = stats["tpot_ms"]
                if draft == "auto":
                    autos.append(stats)
            logs.append(math.log(tpot[0] / tpot["auto"]))
    stderr = statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else 0.0
    return {"auto_vs_k0": math.exp(statistics.mean(logs)), "stderr": stderr, "rounds": len(logs),
            "range": [math.exp(min(logs)), math.exp(max(logs))],
            "draft_histogram": draft_histogram([[s] for s in autos])}  # fmt: skip


def plain_tpot(artifact: Path, prompt_len: int, gen_len: int, threads: int) -> float:
    """Median TPOT of plain greedy decoding (K = 0, EOS ignored) from a random prompt."""
    import nextn
    from nextn.bench.latency import load_prompts

    with nextn.load(artifact, threads=threads) as model:
        model.eos_ids = ()
        prompt = load_prompts(None, None, model.engines.manifest["config"]["vocab_size"], prompt_len, 1)[0]
        model.generate(prompt, max_new_tokens=4)
        return statistics.median(model.generate(prompt, max_new_tokens=gen_len).stats["tpot_ms"] for _ in range(3))


def run_sweep(sizes: list[str], root: Path, embedded: Path, past: int = 64, max_draft: int = 4, threads: int = 1,
              repeats: int = 20, gen_len: int = 64, n_prompts: int = 8, schemes: tuple[str, ...] = (),
              progress=None) -> dict:  # fmt: skip
    from nextn.bench.machine import copy_bandwidth, machine_info
    from nextn.errors import NextnError
    from nextn.export.manifest import read_manifest

    bad = [s for s in sizes if s not in SIZES]
    if bad:
        raise NextnError(f"--sweep {bad[0]!r}: sizes are {', '.join(SIZES)}")
    bad = [s for s in schemes if s not in ("int8", "fp8", "int4")]
    if bad:
        raise NextnError(f"--quant {bad[0]!r}: schemes are int8, fp8, int4")
    root.mkdir(parents=True, exist_ok=True)
    total = len(sizes) * (2 + 2 * len(schemes)) + (max_draft + 1) * n_prompts + 1
    done = [0]

    def tick(what="measure"):
        done[0] += 1
        if progress:
            progress(what, done[0], total)

    t0 = time.perf_counter()
    acc = embedded_acceptance(embedded, max_draft, past, gen_len, n_prompts, threads, lambda: tick("acceptance"))
    L = {k: acc["mean_acceptance_length"][k] for k in range(1, max_draft + 1)}
    emb_costs = step_costs(embedded, past, max_draft, threads, repeats)
    emb_cfg = ModelConfig.from_dict(read_manifest(embedded, verify=False)["config"])
    rows = [{
        "size": "embedded", "parameters": parameter_count(emb_cfg), **emb_costs, "projected_speedup": project(emb_costs, L),
        "measured_speedup": {k: acc["tpot_ms"][0] / acc["tpot_ms"][k] for k in L},
    }]  # fmt: skip
    tick()
    bandwidth = copy_bandwidth(threads)
    for name in sizes:
        art = prepare(name, root)
        tick(f"{name}: export")
        cfg = SIZES[name]()
        costs = step_costs(art, past, max_draft, threads, repeats)
        tpot = plain_tpot(art, past, min(gen_len, 32), threads)
        read = decode_read_bytes(cfg)
        rows.append({"size": name, "parameters": parameter_count(cfg), **costs, "projected_speedup": project(costs, L),
                     "plain_tpot_ms": tpot, "decode_read_bytes": read, "bandwidth_floor_ms": read / bandwidth * 1e3,
                     "vs_floor": tpot / (read / bandwidth * 1e3),
                     "auto": auto_vs_plain(art, past, min(gen_len, 32), threads)})  # fmt: skip
        tick(f"{name}: measure")
        if schemes:
            arts = {"fp32": art}
            for scheme in schemes:
                arts[scheme] = prepare_quantized(name, scheme, art, root)
                tick(f"{name}: quantize {scheme}")
            q = quantized_tpot(arts, past, min(gen_len, 32), threads)
            rows[-1]["quantized"] = {k: {"tpot_ms": q[k], "speedup": q["fp32"] / q[k],
                                         "weights_bytes": read_manifest(a, verify=False)["weights"]["bytes"]}
                                     for k, a in arts.items()}  # fmt: skip
            for _ in schemes:
                tick(f"{name}: measure quantized")
    return {
        "machine": machine_info(threads),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "past": past,
        "embedded_acceptance": acc,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def sweep_table(doc: dict):
    from rich.table import Table

    ks = sorted({k for r in doc["rows"] for k in r["projected_speedup"]})
    t = Table(title=f"model-size sweep: past {doc['past']}, copy bandwidth {doc['copy_bandwidth_gb_s']:.1f} GB/s, "
                    f"{doc['machine']['threads_used']} thread(s)")  # fmt: skip
    schemes = [k for k in next((r["quantized"] for r in doc["rows"] if "quantized" in r), {}) if k != "fp32"]
    for col in ["size", "params", "trunk ms (1 tok)", *[f"verify K={k}" for k in ks], "MTP/trunk",
                *[f"proj. K={k}" for k in ks], "auto vs K=0 (random weights)", "TPOT / floor",
                *[f"{s} TPOT (x fp32)" for s in schemes]]:  # fmt: skip
        t.add_column(col, justify="right")
    for r in doc["rows"]:
        proj = [f"{r['projected_speedup'][k]:.2f}x" for k in ks]
        if "measured_speedup" in r:
            proj = [f"{p} (meas. {r['measured_speedup'][k]:.2f}x)" for p, k in zip(proj, ks)]
        floor = f"{r['plain_tpot_ms']:.2f} / {r['bandwidth_floor_ms']:.2f} ms = {r['vs_floor']:.2f}x" if "vs_floor" in r else "-"
        quant = [f"{r['quantized'][s]['tpot_ms']:.2f} ms ({r['quantized'][s]['speedup']:.2f}x)" if "quantized" in r
                 else "-" for s in schemes]  # fmt: skip
        auto = _auto_cell(r["auto"]) if "auto" in r else "-"
        t.add_row(r["size"], f"{r['parameters']['total'] / 1e6:.1f}M", f"{r['trunk_ms']:.3f}",
                  *[f"{r['verify_cost'][k]:.2f}" for k in ks], f"{r['mtp_cost']:.2f}", *proj, auto, floor, *quant)  # fmt: skip
    return t


def _auto_cell(auto: dict) -> str:
    """'0.99x +-2% (0.85-1.14)': the geometric mean over rounds, its standard error and the rounds' range
    (JSON written before the alternating rounds holds a median and no error)."""
    err = f" +-{(math.exp(auto['stderr']) - 1) * 100:.0f}%" if "stderr" in auto else ""
    return f"{auto['auto_vs_k0']:.2f}x{err} ({auto['range'][0]:.2f}-{auto['range'][1]:.2f})"
