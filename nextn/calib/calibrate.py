"""`nextn calibrate`: an fp32 artifact and calibration data in, a quantized artifact and its report out.

    fp32 artifact ─ find linears per graph (rewrite.py)
                  ─ int8 / fp8: activation ranges, a layer at a time from the source checkpoint
                    (sequential.py; without it: probes of the fp32 graphs, observe.py) ─ Q/DQ  ┐
                  ─ int4: MatMulNBits / QMoE, round-to-nearest or GPTQ, a layer at a time      ┴─ pack_weights ─ manifest
                    from the source checkpoint (sequential.py, gptq.py)
                  ─ quality report against the fp32 artifact (report.py) ─ refuse under the top-1 threshold
                  ─ move into place

The trunk and the MTP graphs may take different schemes (`mtp_scheme`): a cheaper draft can only lower
acceptance, never change output, because the trunk verifies every drafted token. As with export,
everything is written to a temporary folder beside the output and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from nextn.calib import data as calib_data
from nextn.calib import observe, report, sequential, streaming
from nextn.calib import experts as fused
from nextn.calib.rewrite import apply_nbits, apply_qdq, apply_qmoe, find_experts, find_linears, quantize_rtn, weight_kn
from nextn.errors import NextnError
from nextn.export.exporter import COPIED, Steps, check_output, move_into_place
from nextn.export.latent_attention import OP_TYPE as ATTENTION_OP
from nextn.export.manifest import read_manifest, tool_versions, write_manifest
from nextn.export.stream import DeferredWeights
from nextn.export.writer import pack_weights
from nextn.model.weights import trim_heap

log = logging.getLogger(__name__)

SCHEMES = ("int8", "fp8", "int4")
METHODS = ("minmax", "entropy", "percentile")
WEIGHT_METHODS = ("rtn", "gptq")
BLOCK_SIZES = (16, 32, 64, 128)
REPORT_FP32_RAM_FRACTION = 1 / 4  # above, the report takes the source checkpoint's logits a layer at a time
REPORT = "quality_report.json"  # the report, also kept in the manifest under quantization.report

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CalibOptions:
    scheme: str = "int4"  # trunk: int8 | fp8 | int4, or fp32 (kept as exported; then mtp_scheme quantizes the drafts)
    mtp_scheme: str | None = None  # MTP graphs: a scheme or "fp32"; None: as the trunk
    method: str = "minmax"  # activation ranges for int8 / fp8
    weight_method: str = "gptq"  # int4 weights: rtn | gptq
    block_size: int = 64  # int4: input channels per scale (fp32 scales: 4.56 bits a weight, as llama.cpp's q4_0's 4.5)
    head_bits: int = 8  # int4 scheme: bits of the output head (4 or 8)
    samples: int = 32  # calibration sequences
    seq_len: int = 256  # tokens per sequence (longer ones are cut)
    eval_samples: int = 8  # evaluation sequences of the report
    min_top1: float = 0.9  # refuse to write an artifact whose trunk top-1 agreement is below this
    percentile: float = 99.99  # for method "percentile"
    threads: int = 1  # ONNX Runtime intra-op threads (probes and report)
    decode_report: bool = True  # the report's greedy runs (acceptance, speed)
    force: bool = False


def check_options(o: CalibOptions) -> None:
    if o.scheme not in (*SCHEMES, "fp32"):
        raise NextnError(f"--scheme {o.scheme}: choose one of {', '.join(SCHEMES)}, fp32")
    if o.scheme == "fp32" and o.mtp_scheme not in SCHEMES:
        raise NextnError("--scheme fp32 keeps the trunk (and so the output) exactly as exported: give --mtp-scheme "
                         f"{'|'.join(SCHEMES)} to quantize the drafts")  # fmt: skip
    if o.mtp_scheme is not None and o.mtp_scheme not in (*SCHEMES, "fp32"):
        raise NextnError(f"--mtp-scheme {o.mtp_scheme}: choose one of {', '.join(SCHEMES)}, fp32")
    if o.method not in METHODS:
        raise NextnError(f"--method {o.method}: choose one of {', '.join(METHODS)}")
    if o.weight_method not in WEIGHT_METHODS:
        raise NextnError(f"--weight-method {o.weight_method}: choose one of {', '.join(WEIGHT_METHODS)}")
    if o.block_size not in BLOCK_SIZES:
        raise NextnError(f"--block-size {o.block_size}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if o.head_bits not in (4, 8):
        raise NextnError(f"--head-bits {o.head_bits}: choose 4 or 8")
    if not 0.0 <= o.min_top1 <= 1.0:
        raise NextnError(f"--min-top1 {o.min_top1}: must be in [0, 1]")
    if not 50.0 < o.percentile <= 100.0:
        raise NextnError(f"--percentile {o.percentile}: must be in (50, 100]")
    if o.eval_samples < 1:
        raise NextnError(f"--eval-samples {o.eval_samples}: must be >= 1")


def _schemes(manifest: dict, o: CalibOptions) -> dict[str, str]:
    mtp = o.mtp_scheme or o.scheme
    return {name: (o.scheme if name == "trunk" else mtp) for name in manifest["graphs"]}


def calibrate_artifact(
    artifact: str | Path, out: str | Path, data: list[Path], eval_data: list[Path], opts: CalibOptions,
    progress: Progress | None = None, in_memory: bool = False, reference: Path | None = None,
    deferred: DeferredWeights | None = None,
) -> dict:  # fmt: skip
    """Quantize `artifact` into `out`; return the new manifest (its "quantization" holds the report).
    `in_memory`: rewrite each graph with all its tensors loaded (the reference for the streamed rewrite).
    `reference`: the checkpoint `artifact` was exported from; the report then compares with its fp32
    logits computed a layer at a time instead of running the fp32 artifact (and has no decoding runs). It
    is the artifact's source checkpoint anyway when the fp32 weights are over REPORT_FP32_RAM_FRACTION of RAM.
    `deferred`: the artifact's graphs were saved without their weights (export_checkpoint's `deferred`),
    which the rewrite reads from the checkpoint through it."""
    root, out = Path(artifact), Path(out)
    check_options(opts)
    src, dst = root.resolve(), out.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise NextnError(f"-o {out}: is, holds or lies inside the artifact being calibrated ({root}); choose another folder")
    check_output(out, opts.force)
    manifest = read_manifest(root, verify=True)
    if manifest.get("quantization"):
        raise NextnError(f"{root}: already quantized ({_scheme_text(manifest)}); calibrate its fp32 artifact")
    if manifest["dtype"] != "float32":
        raise NextnError(f"{root}: a {manifest['dtype']} artifact; calibration starts from an fp32 export")
    schemes = _schemes(manifest, opts)
    if "fp8" in schemes.values() and manifest["opset"] < 19:
        raise NextnError(f"--scheme fp8: float8 Q/DQ needs opset >= 19; {root} is opset {manifest['opset']} "
                         "(re-export with --opset 23)")  # fmt: skip
    cfg = manifest["config"]
    tokenizer = None
    if manifest.get("tokenizer"):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(root / manifest["tokenizer"]))
    seq_len = min(opts.seq_len, cfg["max_position_embeddings"] - 1)
    cal, ev = calib_data.calibration_and_eval(data, eval_data, tokenizer, cfg["vocab_size"], opts.samples, seq_len,
                                              opts.eval_samples)  # fmt: skip
    graphs = {name: onnx.load(str(root / g["file"]), load_external_data=False)
              for name, g in manifest["graphs"].items()}  # fmt: skip
    linears = {name: find_linears(m) for name, m in graphs.items()}
    moes = {name: find_experts(m) for name, m in graphs.items()}
    del graphs

    source = Path(manifest["source"])
    layer_gptq = opts.weight_method == "gptq" and "int4" in schemes.values()
    if layer_gptq:  # before any calibration work
        sequential.check_source(source)
    qdq = any(s in ("int8", "fp8") for s in schemes.values())
    ranges_from_source = qdq and sequential.has_source(source)
    passes = _passes(schemes, opts) if qdq and not ranges_from_source else 0
    layer_pass = layer_gptq or ranges_from_source
    if reference is None and sequential.has_source(source) and _fp32_too_large(manifest):
        reference = source  # the report without the fp32 artifact in ONNX Runtime (and without decoding runs)
        log.info("the fp32 artifact is over %.0f%% of RAM: the report compares with %s a layer at a time",
                 100 * REPORT_FP32_RAM_FRACTION, source)  # fmt: skip
    n_decode = len(ev.ids) if opts.decode_report and reference is None else 0
    n_layers = cfg["num_hidden_layers"] + len(schemes) - 1 if layer_pass else 0
    step = Steps(progress, passes * len(cal.ids) + n_layers + len(schemes) + 2 + n_decode)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        stats = _observe(root, manifest, schemes, linears, cal.ids, opts, passes, step, tmp / "probe")
        shutil.rmtree(tmp / "probe", ignore_errors=True)
        layered = None
        if layer_pass:
            settings = sequential.PassSettings(opts.block_size, opts.head_bits, BLOCK_SIZES, opts.method != "minmax")
            passed = {g: "int4-rtn" if s == "int4" and not layer_gptq else s for g, s in schemes.items()}
            layered = sequential.sequential_pass(source, manifest, passed, cal.ids, settings, tmp / "gptq",
                                                 lambda: step("calibrate: a layer at a time"))  # fmt: skip
        gptq_out = layered if layer_gptq else None
        t0 = time.perf_counter()
        kept: list[dict] = []
        details = {}
        for name, g in manifest["graphs"].items():
            step(f"quantize {g['file']} ({schemes[name]})")
            ranges = layered if ranges_from_source else stats.get(name, {})
            details[name] = _quantize_graph(root / g["file"], tmp / g["file"], schemes[name], linears[name],
                                            ranges, opts, kept, name, moes[name], gptq_out, in_memory,
                                            deferred)  # fmt: skip
        if deferred is not None:
            deferred.release()  # the checkpoint group the rewrite read last
            trim_heap()
        step("pack weights")
        packed = pack_weights([tmp / g["file"] for g in manifest["graphs"].values()], tmp / "weights.bin")
        for f in COPIED:
            if (root / f).is_file():
                shutil.copyfile(root / f, tmp / f)
        new = {k: v for k, v in manifest.items() if k not in ("files", "validation")}
        new["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        new["weights"] = {"file": "weights.bin", "unique_weight_bytes": packed["bytes"], **packed}
        new["validation"] = []  # the quality report below replaces the fp32 export's checks
        new["tools"] = tool_versions()
        new["quantization"] = {
            "graphs": details,
            "options": asdict(opts),
            "source_artifact": str(root.resolve()),
            "source_weights_sha256": None if deferred else manifest["files"][manifest["weights"]["file"]]["sha256"],
            "quantize_seconds": round(time.perf_counter() - t0, 2),
        }
        write_manifest(tmp, new)  # the report's engines open the artifact through it

        step("quality report: agreement")
        rep = _report(root, manifest, tmp, new, cal, ev, opts, schemes, kept, step, reference)
        rep["attention_bf16"] = sum(d.get("attention_bf16", 0) for d in details.values())
        new["quantization"]["report"] = rep
        (tmp / REPORT).write_text(json.dumps(rep, indent=2))
        write_manifest(tmp, new, hashed=new["files"])  # only the report file is new
        if rep["trunk"]["top1_agreement"] < opts.min_top1:
            raise NextnError(
                f"trunk top-1 agreement {rep['trunk']['top1_agreement']:.4f} is under --min-top1 {opts.min_top1:g} "
                f"({schemes['trunk']}, {ev.source}): nothing written to {out}; try another --scheme or --method, "
                "more --samples, or lower --min-top1"
            )
        move_into_place(tmp, out)
        return new
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fp32_too_large(manifest: dict) -> bool:
    """Whether the report's fp32 side should not run the fp32 artifact: its weights (which ONNX Runtime
    pre-packs, about once more their bytes) over REPORT_FP32_RAM_FRACTION of physical memory."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return manifest["weights"]["bytes"] > REPORT_FP32_RAM_FRACTION * ram


def _passes(schemes: dict[str, str], opts: CalibOptions) -> int:
    """Probe passes over the calibration data: activation ranges (int8 / fp8), then histograms if the
    method needs them. int4 needs none (GPTQ runs the checkpoint itself, sequential.py)."""
    if not any(s in ("int8", "fp8") for s in schemes.values()):
        return 0
    return 1 if opts.method == "minmax" else 2


def _observe(root, manifest, schemes, linears, sequences, opts, passes, step, scratch: Path) -> dict:
    """Activation statistics of the Q/DQ graphs: {graph: {activation: TensorStats}}."""
    if not passes:
        return {}
    from nextn.runtime.engines import SharedWeights

    shared = SharedWeights(root / manifest["weights"]["file"])
    probes, stats = {}, {}
    with shared.dropping_pages():  # the probes pre-pack: their originals need not stay resident
        for name, g in manifest["graphs"].items():
            probed = sorted({lin.x for lin in linears[name][0]}) if schemes[name] in ("int8", "fp8") else []
            if name == "trunk" or probed:  # the trunk always runs: the MTP graphs need its hidden states
                probes[name] = observe.open_probe(name, root / g["file"], probed, shared, scratch, opts.threads)
                stats[name] = {p: observe.TensorStats() for p in probed}

    def ranges(graph, arrays):
        for p, s in stats[graph].items():
            s.update_range(arrays[p])

    def hists(graph, arrays):
        for p, s in stats[graph].items():
            s.update_hist(arrays[p])

    observe.drive(probes, manifest["config"], sequences, ranges, lambda: step("calibrate: ranges"))
    if passes == 2:
        observe.drive(probes, manifest["config"], sequences, hists, lambda: step("calibrate: histograms"))
    return stats


def _quantize_graph(src: Path, dst: Path, scheme: str, found, ranges: dict | sequential.Quantized,
                    opts: CalibOptions, kept: list[dict], graph: str, moes: list,
                    gptq_out: sequential.Quantized | None, in_memory: bool = False,
                    deferred: DeferredWeights | None = None) -> dict:  # fmt: skip
    """Rewrite one graph into `dst` (+ its .data), one weight in memory at a time (streaming.py;
    `in_memory`: load them all instead, the reference the tests compare the streamed rewrite with).
    `ranges`: the int8 / fp8 linears' input statistics, from the layer-at-a-time pass (by weight) or the
    probes (by activation name). `gptq_out`: what sequential GPTQ chose for the int4 weights (None:
    round-to-nearest)."""
    lins, routers = found
    stream = not in_memory
    model = onnx.load(str(src), load_external_data=not stream)
    read = streaming.TensorReader(src.parent, deferred) if stream else onnx.numpy_helper.to_array
    spill = streaming.Spill(dst.parent / f"{dst.name}.data") if stream else None
    detail: dict = {"scheme": scheme, "linears": 0, "routers_float": len(routers)}
    if scheme in ("int8", "fp8"):
        amax, use = {}, []
        for lin in lins:
            s = _input_stats(ranges, graph, lin, model, read)
            reason = ("no calibration token reached it" if s.rows == 0 else "non-finite activations" if not s.finite
                      else "activation always zero" if s.amax <= 0 else None)  # fmt: skip
            if reason:
                kept.append({"graph": graph, "node": lin.node, "reason": reason})
                continue
            amax[lin.x] = observe.calibrated_amax(s, opts.method, opts.percentile)
            use.append(lin)
        apply_qdq(model, use, amax, scheme, read, spill)
        chosen = np.asarray(list(amax.values()) or [0.0])
        source = "fp32 graphs (probes)" if isinstance(ranges, dict) else "source checkpoint (a layer at a time)"
        detail |= {"linears": len(use), "activations": len(amax), "method": opts.method, "ranges_from": source,
                   "activation_amax": {"min": float(chosen.min()), "median": float(np.median(chosen)),
                                       "max": float(chosen.max())}}  # fmt: skip
    elif scheme == "int4":
        methods = {"rtn": 0, "gptq": 0}
        by_node = {lin.node: lin for lin in lins}
        apply_nbits(model, streaming.LazyMap(by_node, lambda node: _quantize_linear(
            model, by_node[node], opts, methods, graph, read, gptq_out)), spill=spill)  # fmt: skip
        detail |= {"linears": len(lins), "block_size": opts.block_size, "head_bits": opts.head_bits,
                   "weights": methods}  # fmt: skip
    if moes and scheme in SCHEMES:  # an "fp32" MTP graph keeps everything float, experts included
        gptq_experts = gptq_out if scheme == "int4" else None  # int8's QMoE experts are round-to-nearest
        detail["experts"] = _quantize_experts(model, scheme, moes, gptq_experts, opts, kept, graph, read, spill)
    if scheme in SCHEMES:
        detail["attention_bf16"] = _attention_weights_to_bf16(model, read, spill)
    if stream:
        streaming.save_streamed(model, dst, read, spill)
    else:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{dst.name}.data", size_threshold=streaming.SIZE_THRESHOLD)  # fmt: skip
    return detail


def _attention_weights_to_bf16(model: onnx.ModelProto, read, spill) -> int:
    """Round each attention node's kv_b_proj to bfloat16 values, in place. -> how many were not already.

    kv_b_proj's products run inside the attention (W_UK and W_UV per head), not as a linear the schemes
    quantize, so it stayed fp32: on issue 14's 1 GB checkpoint 25 of the 107 MB an int4 token reads. Its
    values rounded to bf16 (8 significant bits, relative error <= 2^-9, finer than any scheme's weights) are
    read by the runtime's attention kernel as bf16 (runtime/latent_attention.py): half the bytes. A bf16
    checkpoint's are bf16 values already and do not change."""
    changed = 0
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        t = inits.get(node.input[-1]) if node.op_type == ATTENTION_OP and len(node.input) == 9 else None
        if t is None or t.data_type != onnx.TensorProto.FLOAT:
            continue
        w = read(t)
        rounded = round_to_bf16(w)
        if np.array_equal(rounded, w):
            continue
        new = onnx.numpy_helper.from_array(rounded, t.name)
        t.CopyFrom(spill(new) if spill is not None else new)
        changed += 1
    return changed


def round_to_bf16(w: np.ndarray) -> np.ndarray:
    """fp32 values rounded to the nearest bfloat16 ones (ties to even), still fp32."""
    bits = np.ascontiguousarray(w, np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)


def _input_stats(ranges: dict | sequential.Quantized, graph: str, lin, model, read) -> observe.TensorStats:
    if isinstance(ranges, dict):
        return ranges[lin.x]
    found = ranges.input_stats(graph, weight_kn(model, lin, read))
    if found is None:
        raise NextnError(f"{graph} node {lin.node}'s weights are not the source checkpoint's (changed since the "
                         "export?); re-export it")  # fmt: skip
    return found


def _quantize_linear(model, lin, opts: CalibOptions, methods: dict, graph: str, read,
                     gptq_out: sequential.Quantized | None):  # fmt: skip
    """One linear's int4 (or head_bits) blockwise weight: what sequential GPTQ chose for it, or round-to-nearest."""
    w = weight_kn(model, lin, read)
    if gptq_out is not None:
        found = gptq_out.linear(graph, w)
        if found is None:
            raise _not_from_source(graph, lin.node)
        q, method = found
    else:
        q, method = quantize_rtn(w, opts.block_size, opts.head_bits if lin.head else 4), "rtn"
    methods[method] += 1
    return lin, q


def _not_from_source(graph: str, node: str) -> NextnError:
    return NextnError(f"--weight-method gptq: {graph} node {node}'s weights are not the source checkpoint's (changed "
                      "since the export?); re-export it, or use --weight-method rtn")  # fmt: skip


def _quantize_experts(model, scheme: str, moes: list, gptq_out: sequential.Quantized | None, opts: CalibOptions,
                      kept: list[dict], graph: str, read, spill) -> dict:  # fmt: skip
    """Fused MoE nodes -> QMoE (experts.py); those QMoE cannot take stay float and are listed in `kept`.
    Each node's experts are read and quantized when the rewrite reaches it."""
    bits = fused.expert_bits(scheme)
    inits = {t.name: t for t in model.graph.initializer}
    todo, methods, sizes = {}, {"rtn": 0, "gptq": 0}, set()
    for ex in moes:
        reason = fused.unsupported(ex, opts.block_size, BLOCK_SIZES) if bits else f"{scheme}: no CPU QMoE kernel for it"
        if reason:
            kept.append({"graph": graph, "node": ex.node, "reason": f"fused MoE experts: {reason}"})
            continue
        block = fused.expert_block_size(ex, opts.block_size, BLOCK_SIZES)
        sizes.add(block)
        todo[ex.node] = (ex, block)

    def quantize(node: str):
        ex, block = todo[node]
        w13 = read(inits[ex.w13]).astype(np.float32, copy=False)
        if gptq_out is not None:
            found = gptq_out.experts(graph, w13)
            if found is None:
                raise _not_from_source(graph, node)
            fc1, fc2, counts = found
            for m, n in counts.items():
                methods[m] += n
            return fc1, fc2
        w2 = read(inits[ex.w2]).astype(np.float32, copy=False)
        return fused.quantize_experts(w13, w2, None, block, bits, methods)

    apply_qmoe(model, streaming.LazyMap(todo, quantize), spill=spill)
    return {"moe_layers": len(todo), "bits": bits, "weights": methods, "block_sizes": sorted(sizes)}


def _report(root, manifest, tmp, new, cal, ev, opts, schemes, kept, step, reference=None) -> dict:
    from nextn.runtime.engines import open_engines

    # no second sha256 pass: `root` was verified on entry and `tmp` was written by this process
    if reference is not None:
        # The checkpoint's fp32 logits, a layer at a time, before any session opens (no fp32 session at
        # all). The quantized graphs run as `nextn run` runs them (pre-packing changes MatMulNBits'
        # arithmetic: int8 activations), so the report says what a user gets.
        from nextn.model.checkpoint import Checkpoint
        from nextn.model.streamed import trunk_logits

        with tempfile.TemporaryDirectory(prefix=".fp32-logits.", dir=tmp.parent) as kept_logits:
            files = []
            for i, logits in enumerate(trunk_logits(Checkpoint(reference), ev.ids)):  # [n, V] per sequence
                files.append(Path(kept_logits) / f"{i}.npy")
                np.save(files[-1], logits)  # on disk, read back one at a time
            trim_heap()
            with open_engines(tmp, threads=opts.threads, verify=False) as quant:
                trunk = report.agreement((np.load(f) for f in files), quant, ev.ids, manifest["config"])
        dec = None  # greedy runs of the fp32 artifact would hold it whole
    else:
        with open_engines(tmp, threads=opts.threads, verify=False) as quant:
            with open_engines(root, threads=opts.threads, verify=False) as base:
                trunk = report.agreement(base, quant, ev.ids, manifest["config"])
                draft = manifest["config"]["num_nextn_predict_layers"]
                dec = None
                if opts.decode_report:
                    dec = report.decoding(base, quant, ev.ids, draft, lambda: step("quality report: decoding"))
    fp32_bytes, q_bytes = report.artifact_bytes(manifest), report.artifact_bytes(new)
    return {
        "scheme": {"trunk": schemes["trunk"], "mtp": next((s for g, s in schemes.items() if g != "trunk"), "none")},
        "method": opts.method,
        "weight_method": opts.weight_method,
        "block_size": opts.block_size,
        "threshold": opts.min_top1,
        "calibration": {"sequences": len(cal.ids), "tokens": cal.tokens, "source": cal.source},
        "evaluation": {"sequences": len(ev.ids), "tokens": ev.tokens, "source": ev.source},
        "trunk": trunk,
        "decoding": dec,
        "size": {"fp32_bytes": fp32_bytes, "bytes": q_bytes, "ratio": fp32_bytes / q_bytes},
        "kept_float": kept,
        "passed": trunk["top1_agreement"] >= opts.min_top1,
    }


def _scheme_text(manifest: dict) -> str:
    q = manifest["quantization"]["graphs"]
    return ", ".join(f"{g} {d['scheme']}" for g, d in q.items())


def quantize_checkpoint(checkpoint: str | Path, out: str | Path, export_opts, opts: CalibOptions, data: list[Path],
                        progress: Progress | None = None) -> dict:  # fmt: skip
    """`nextn export CHECKPOINT -o OUT --quantize SCHEME`: export the fp32 graphs without their weights
    (export_checkpoint's `deferred`: references into the checkpoint) into a temporary folder beside `out`,
    then quantize them into `out` with calibrate_artifact (the same code and options as `nextn calibrate`):
    the rewrite reads each weight from the checkpoint when it reaches it, a group of layers loaded at a
    time, activation ranges come from the checkpoint a layer at a time, and the report compares with the
    checkpoint's own fp32 logits. No fp32 weights are ever written; the temporary folder holds graphs only."""
    from nextn.export.exporter import export_checkpoint

    out = Path(out)
    if export_opts.dtype != "fp32":
        raise NextnError(f"--quantize {opts.scheme}: quantizes an fp32 export (drop --dtype {export_opts.dtype})")
    check_options(opts)
    check_output(out, opts.force)
    if not data and not (Path(checkpoint) / "tokenizer.json").is_file():  # before hours of export, not after
        raise NextnError(f"--data: {checkpoint} has no tokenizer.json; give calibration token ids (.ids or .jsonl)")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.fp32.", dir=out.parent))
    try:
        deferred = DeferredWeights()
        export_checkpoint(checkpoint, scratch / "fp32", export_opts, progress, deferred)
        return calibrate_artifact(scratch / "fp32", out, data, [], opts, progress, reference=Path(checkpoint),
                                  deferred=deferred)  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
