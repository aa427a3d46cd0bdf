"""The `nextn` command. Each subcommand parses, calls one library function, and prints."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click

from nextn.embedded import DRAFT_SCHEMES, QUANT_SCHEMES
from nextn.errors import NextnError
from nextn.runtime.sampling import AcceptRule


# run, bench and serve: hash every byte before opening (`nextn verify`), not only changed files
_verify_option = click.option("--verify", "verify_all", is_flag=True,
                              help="Check every file's sha256 first [default: only files changed since last "
                                   "verified here].")  # fmt: skip


class _Group(click.Group):
    """Turns a NextnError into one line on stderr and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NextnError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
@click.version_option(package_name="nextn")
def cli(verbose: bool) -> None:
    """nextn: deploy DeepSeek-V3-style models with their MTP modules as draft models."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("nextn").setLevel(logging.INFO if verbose else logging.WARNING)


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _bytes(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def format_plan(path: str, p: dict) -> str:
    def gb(n: float) -> str:
        for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
            if n >= div:
                return f"{n / div:,.1f} {unit}"
        return f"{n / 1e3:,.1f} kB"

    lines = [f"plan for {path}: {p['parameters'] / 1e9:,.2f}B parameters ({p['trunk_parameters'] / 1e9:,.2f}B trunk), "
             f"decode floor at {p['bandwidth_gbs']:.1f} GB/s with {p['context']} tokens of KV cache",
             f"{'scheme':<7} {'artifact':>11} {'peak RSS':>19} {'disk':>11} {'KV / token':>11} {'read / token':>13} "
             f"{'floor / token':>14}"]  # fmt: skip
    for name, s in p["schemes"].items():
        lo, hi = s["peak_rss_bytes"]
        rss = gb(lo) if lo == hi else f"{gb(lo)} - {gb(hi)}"
        lines.append(f"{name:<7} {gb(s['artifact_bytes']):>11} {rss:>19} {gb(s['disk_bytes']):>11} "
                     f"{s['kv_bytes_per_token'] / 1e3:>8.1f} kB {gb(s['read_bytes_per_token']):>13} "
                     f"{s['decode_floor_ms']:>11.1f} ms")  # fmt: skip
    lines.append("peak RSS: the export streams (a group of layers at a time); int8/int4 (export --quantize) write no "
                 "fp32 weights, quantize a tensor at a time, then their report runs the quantized graphs; "
                 "disk: graph data and weights.bin")
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    c, p, kv = s["config"], s["parameters"], s["kv_cache_bytes_per_1k_tokens"]
    lines = [
        f"checkpoint  {s['path']}  ({s['model_type']}, {s['files']['count']} file(s), {_bytes(s['files']['bytes'])})",
        f"trunk       {c['num_hidden_layers']} layers ({c['dense_layers']} dense, {c['moe_layers']} MoE), "
        f"hidden {c['hidden_size']}, {c['num_attention_heads']} heads, vocab {c['vocab_size']}",
        f"MLA         q_lora_rank {c['q_lora_rank']}, kv_lora_rank {c['kv_lora_rank']}, "
        f"head dims nope {c['qk_nope_head_dim']} / rope {c['qk_rope_head_dim']} / v {c['v_head_dim']}, "
        f"rope {c['rope']}, context {c['max_position_embeddings']}",
        f"MoE         {c['n_routed_experts']} routed (top {c['num_experts_per_tok']}, "
        f"{c['n_group']} groups, top {c['topk_group']} groups) + {c['n_shared_experts']} shared",
        f"MTP depth   {s['mtp_depth']}",
        f"parameters  total {_count(p['total'])}",
        f"            trunk {_count(p['trunk'])}, shared embedding/head {_count(p['shared'])}, "
        f"active per token {_count(p['trunk_active_per_token'])}",
    ]
    for k, n in enumerate(p["mtp"]):
        lines.append(f"            MTP module {k} {_count(n)}")
    dt = ", ".join(f"{k} {v['tensors']} tensors / {_bytes(v['bytes'])}" for k, v in sorted(s["dtypes"].items()))
    lines.append(f"dtypes      {dt}; activations {c['torch_dtype']}; quantization {c['quantization'] or 'none'}")
    mtp_kv = f" + MTP {_bytes(sum(kv['mtp']))}" if kv["mtp"] else ""
    lines.append(f"KV cache    latent, {kv['dtype']}: {_bytes(kv['trunk'])} per 1k tokens (trunk){mtp_kv}")
    lines.append(f"tokenizer   {'tokenizer.json' if s['tokenizer'] else 'none'}; EOS ids {c['eos_token_ids']}")
    return "\n".join(lines)


@cli.command()
@click.argument("path", type=click.Path(), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--plan", "plan_only", is_flag=True,
              help="From config.json alone: artifact size, peak memory and disk, KV-cache bytes, bytes a decoded "
                   "token reads and the decode floor, per scheme.")  # fmt: skip
@click.option("--bandwidth", type=float, default=None,
              help="With --plan: read bandwidth in GB/s for the floor [default: this machine's, measured].")
@click.option("--context", type=int, default=4096, show_default=True, help="With --plan: tokens of KV cache read.")
def inspect(path: str | None, as_json: bool, plan_only: bool, bandwidth: float | None, context: int) -> None:
    """Summarize a checkpoint folder (config, parameters, dtypes, MTP depth, KV-cache size) or an
    exported artifact (graphs, their inputs and outputs, files, validation). Default: the embedded model."""
    from pathlib import Path

    from nextn.embedded import embedded_checkpoint
    from nextn.export.manifest import MANIFEST

    path = path or str(embedded_checkpoint())
    if plan_only:
        from nextn.model.config import read_config
        from nextn.model.plan import plan

        if bandwidth is not None and not bandwidth > 0:
            raise NextnError(f"--bandwidth {bandwidth}: must be > 0 (GB/s)")
        if context < 0:
            raise NextnError(f"--context {context}: must be >= 0")
        cfg = read_config(Path(path))
        if bandwidth is None:
            from nextn.bench.floor import read_bandwidth

            bandwidth = read_bandwidth(os.cpu_count() or 1) / 1e9
        p = plan(cfg, bandwidth, context)
        click.echo(json.dumps(p, indent=2) if as_json else format_plan(path, p))
        return

    if (Path(path) / MANIFEST).is_file():
        from nextn.export.summary import format_artifact, summarize_artifact

        summary = summarize_artifact(path)
        click.echo(json.dumps(summary, indent=2) if as_json else format_artifact(summary))
        return
    from nextn.model.summary import summarize_checkpoint

    summary = summarize_checkpoint(path)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@cli.command()
@click.argument("checkpoint", type=click.Path(), required=False)
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Artifact folder to write.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--mtp-layers", type=int, default=None, help="MTP modules to export [default: all].")
@click.option("--opset", type=int, default=23, show_default=True)
@click.option("--attention", type=click.Choice(["absorbed", "naive"]), default="absorbed", show_default=True,
              help="MLA form in the graphs (BENCHMARKS.md measures both).")  # fmt: skip
@click.option("--moe", type=click.Choice(["auto", "fused", "sparse"]), default="auto", show_default=True,
              help="Routed experts as ONNX Runtime's fused MoE op, or standard ONNX ops per expert (for other "
                   "runtimes); auto: fused where the checkpoint allows it.")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--validation", type=click.Choice(["auto", "full", "truncated"]), default="auto", show_default=True,
              help="Check the graphs against the reference holding the whole model (full) or, so that memory stays "
                   "bounded by a layer, the trunk on a twin of its first layers and each MTP graph whole "
                   "(truncated); auto: full up to 1 GiB of weights.")  # fmt: skip
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None,
              help="Write a quantized artifact in one go: nextn calibrate's defaults with round-to-nearest weights, "
                   "its quality report and --min-top1 refusal; the fp32 export is temporary.")  # fmt: skip
@click.option("--data", multiple=True, type=click.Path(),
              help="With --quantize: calibration file(s), as nextn calibrate's --data [default: the stdlib, needs "
                   "a tokenizer].")  # fmt: skip
@click.option("--min-top1", type=float, default=0.9, show_default=True,
              help="With --quantize: refuse under this trunk top-1 agreement with fp32.")
def export(checkpoint: str | None, out: str, dtype: str, mtp_layers: int | None, opset: int, attention: str,
           moe: str, force: bool, validation: str, quantize: str | None, data: tuple[str, ...],
           min_top1: float):  # fmt: skip
    """Export the trunk and each MTP module of CHECKPOINT (default: the embedded model) as validated ONNX graphs."""
    from nextn.embedded import embedded_checkpoint
    from nextn.export.exporter import ExportOptions, export_checkpoint

    checkpoint = checkpoint or str(embedded_checkpoint())
    from nextn.export.summary import format_validation

    opts = ExportOptions(dtype=dtype, mtp_layers=mtp_layers, opset=opset, attention=attention, moe=moe, force=force,
                         validation=validation)  # fmt: skip
    if quantize is None and (data or min_top1 != 0.9):
        raise NextnError("--data/--min-top1: only with --quantize")
    if quantize:
        from nextn.calib.calibrate import CalibOptions, quantize_checkpoint
        from nextn.calib.report import format_report

        calib = CalibOptions(scheme=quantize, weight_method="rtn", min_top1=min_top1, force=force)
        with _progress("export --quantize") as progress:
            manifest = quantize_checkpoint(checkpoint, out, opts, calib, [Path(d) for d in data], progress)
        click.echo(format_report(manifest["quantization"]["report"]))
        click.echo(f"wrote {out}: {', '.join(manifest['graphs'])} ({quantize}); weights.bin "
                   f"{_bytes(manifest['weights']['bytes'])}")  # fmt: skip
        return
    with _progress("export") as progress:
        manifest = export_checkpoint(checkpoint, out, opts, progress)
    click.echo(format_validation(manifest))
    w = manifest["weights"]
    click.echo(f"wrote {out}: {', '.join(manifest['graphs'])}; weights.bin {_bytes(w['bytes'])} "
               f"({len(w['shared'])} tensor(s) shared between graphs)")  # fmt: skip


@cli.command()
@click.argument("artifact", type=click.Path(), required=False)
@click.option("--prompt", help="Prompt text (needs the artifact's tokenizer.json).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--draft", default="auto", show_default=True,
              help="Tokens drafted by the MTP modules per step: auto (chosen before each step from measured costs and "
                   "acceptance; 0 where drafting does not pay) or a fixed K (0: off).")  # fmt: skip
@click.option("--accept", default="exact", show_default=True, type=click.Choice(AcceptRule.MODES),
              help="relaxed: LOSSY, greedy only; also accept a draft in the target's top --relaxed-top tokens within "
                   "--relaxed-delta of its top log-probability (TensorRT-LLM's rule).")  # fmt: skip
@click.option("--relaxed-top", type=int, default=None, help="With --accept relaxed: top N [default: 3].")
@click.option("--relaxed-delta", type=float, default=None, help="With --accept relaxed: log-prob margin [default: 0.5].")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--backend", default="ort", show_default=True, help="ort or torch.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--threads", type=int, default=0,
              help="Intra-op threads of the trunk (0: the backend's default); the MTP drafts run on one.")
@click.option("--prepack/--no-prepack", default=None,
              help="ONNX Runtime pre-packs weights per graph: faster, more memory [default: when the weights take "
                   "at most 1/8 of RAM].")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@_verify_option
def run(artifact, prompt, prompt_ids, max_new_tokens, draft, accept, relaxed_top, relaxed_delta, temperature, top_k,
        top_p, seed, stop, backend, device, threads, prepack, as_json, verify_all):  # fmt: skip
    """Generate from an exported ARTIFACT (default: the embedded model, exported on first use): text
    streams to stdout, stats go to stderr."""
    import sys

    import nextn

    if (prompt is None) == (prompt_ids is None):
        raise NextnError("give exactly one of --prompt and --prompt-ids")
    if prompt_ids is not None:
        try:
            prompt = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise NextnError(f"--prompt-ids {prompt_ids!r}: expected comma-separated integers") from None
    artifact = artifact or _embedded_default()
    if verify_all:
        _verify(artifact)
    kwargs = dict(max_new_tokens=max_new_tokens, draft=parse_draft("--draft", draft), temperature=temperature,
                  top_k=top_k, top_p=top_p, seed=seed, stop=list(stop) or None,
                  accept=accept, relaxed_top=relaxed_top, relaxed_delta=relaxed_delta)  # fmt: skip
    with nextn.load(artifact, backend=backend, device=device, threads=threads, prepack=prepack) as model:
        if as_json:
            click.echo(json.dumps(model.generate(prompt, **kwargs).to_dict()))
            return
        stats = None
        for piece in model.generate(prompt, stream=True, **kwargs):
            if piece.token_ids:
                click.echo(piece.text if model.tokenizer else " ".join(map(str, piece.token_ids)) + " ", nl=False)
                sys.stdout.flush()
            stats = piece.stats or stats
        click.echo()
    click.echo(_format_stats(stats), err=True)


def parse_draft(flag: str, value: str) -> int | str:
    """"auto" or an integer K >= 0."""
    if str(value).strip() == "auto":
        return "auto"
    try:
        k = int(value)
    except ValueError:
        raise NextnError(f"{flag} {value!r}: expected auto or an integer >= 0") from None
    if k < 0:
        raise NextnError(f"{flag} {k}: must be >= 0")
    return k


def _per_position(s: dict, fmt: str) -> str:
    """Acceptance per draft position, for the positions that were drafted at all."""
    return ", ".join(fmt.format(a) for a, d in zip(s["accepted_per_position"], s["drafted_per_position"]) if d) or "-"


def _format_stats(s: dict) -> str:
    per_pos = _per_position(s, "{:.2f}")
    t = s["time_ms"]
    line = (f"{s['new_tokens']} tokens, TTFT {s['ttft_ms']:.1f} ms, TPOT {s['tpot_ms']:.2f} ms, "
            f"{s['tokens_per_s']:.1f} tok/s; {s['steps']} verify steps, acceptance per position [{per_pos}], "
            f"mean acceptance length {s['mean_acceptance_length']:.2f}; time trunk {t['trunk']:.0f} ms, "
            f"MTP {t['mtp']:.0f} ms, host {t['host']:.0f} ms")  # fmt: skip
    if s.get("draft") == "auto":
        hist = " ".join(f"K={k}:{n}" for k, n in s["draft_histogram"].items())
        line += f"; draft auto, steps per K [{hist}]"
        if s.get("predicted_gain") and s.get("measured_gain"):
            line += f", predicted gain {s['predicted_gain']:.2f}x, measured {s['measured_gain']:.2f}x (vs modelled K=0)"
    if s.get("acceptance", "exact") != "exact":
        line += f"; acceptance {s['acceptance']}: output may differ from plain greedy decoding"
    return line


def _int_list(flag: str, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise NextnError(f"{flag} {value!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not out:
        raise NextnError(f"{flag}: give at least one value")
    return out


def _draft_list(flag: str, value: str) -> tuple[int | str, ...]:
    out = tuple(parse_draft(flag, x.strip()) for x in value.split(",") if x.strip())
    if not out:
        raise NextnError(f"{flag}: give at least one value")
    return out


def _name_list(flag: str, value: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    out = tuple(x.strip() for x in value.split(",") if x.strip() and x.strip() != "none")
    bad = [x for x in out if x not in allowed]
    if bad:
        raise NextnError(f"{flag} {bad[0]!r}: expected one of {', '.join(allowed)}")
    return out


@cli.command()
@click.argument("artifact", type=click.Path(), required=False)
@click.option("--draft", "drafts", default="0,1,2,3,auto", show_default=True,
              help="Draft depths K to measure (auto: the runtime's per-step choice).")
@click.option("--batch", "batches", default="1", show_default=True, help="Batch sizes to measure.")
@click.option("--prompt-len", type=int, default=64, show_default=True)
@click.option("--gen-len", type=int, default=128, show_default=True)
@click.option("--prompts", "prompts_file", type=click.Path(), default=None,
              help="Prompts: text (one per line) or .jsonl [default: held-out Python stdlib files].")
@click.option("--backend", "backends", default="ort", show_default=True, help="ort, torch, or both: ort,torch.")
@click.option("--baseline", "baselines", default="auto", show_default=True,
              help="transformers (eager generate, use_mtp off and on), none, or auto: transformers when installed.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed runs per configuration.")
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True,
              help="Intra-op threads of the trunk, for every backend (0: each backend's default; ONNX Runtime's "
                   "drafts run on one).")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write every raw figure to this file.")
@click.option("--plot", "plot_out", type=click.Path(), default=None, help="Write a PNG plot to this file.")
@click.option("--sweep", "sweep", default=None,
              help="Instead: the model-size sweep over these sizes (tiny,10m,30m,70m,270m,1b), projected with "
                   "ARTIFACT's acceptance.")  # fmt: skip
@click.option("--sweep-dir", type=click.Path(), default=None,
              help="Where the sweep keeps its checkpoints and exports [default: the cache folder].")
@click.option("--quant", default="", help="With --sweep: also quantize each size (int8,int4,fp8) and time its decoding.")
@_verify_option
def bench(artifact, drafts, batches, prompt_len, gen_len, prompts_file, backends, baselines, repeats, warmup,
          threads, json_out, plot_out, sweep, sweep_dir, quant, verify_all):  # fmt: skip
    """Latency per token of ARTIFACT (default: the embedded model) at each draft depth, with baselines."""
    from pathlib import Path

    from rich.console import Console

    from nextn.bench.report import write_json

    if sweep:
        from nextn.bench.report import write_sweep_plot as write_plot
        from nextn.bench.sweep import run_sweep, sweep_table
        from nextn.embedded import cache_root

        artifact = artifact or _embedded_default()
        root = Path(sweep_dir) if sweep_dir else cache_root() / "sweep"
        with _progress("sweep") as progress:
            doc = run_sweep([s.strip() for s in sweep.split(",") if s.strip()], root, Path(artifact),
                            past=prompt_len, max_draft=max((k for k in _draft_list("--draft", drafts) if k != "auto"),
                                                           default=4), threads=threads,
                            schemes=_name_list("--quant", quant, ("int8", "fp8", "int4")),
                            progress=progress)  # fmt: skip
        table, lines, width = sweep_table(doc), [], 200
    else:
        from nextn.bench.latency import BenchConfig
        from nextn.bench.report import ratio_lines, results_table, write_plot
        from nextn.bench.run import run_bench

        if quant:
            raise NextnError("--quant: only with --sweep (a quantized artifact is benchmarked like any other: "
                             "nextn bench ARTIFACT)")  # fmt: skip

        if baselines == "auto":
            import importlib.util

            baselines = "transformers" if importlib.util.find_spec("transformers") else "none"
            if baselines == "none":
                click.echo("note: transformers is not installed, so no baseline is measured", err=True)
        cfg = BenchConfig(drafts=_draft_list("--draft", drafts), batches=_int_list("--batch", batches),
                          prompt_len=prompt_len, gen_len=gen_len,
                          backends=_name_list("--backend", backends, ("ort", "torch")),
                          baselines=_name_list("--baseline", baselines, ("transformers",)), warmup=warmup,
                          repeats=repeats, threads=threads)  # fmt: skip
        if not cfg.backends:
            raise NextnError("--backend: give at least one of ort, torch")
        artifact = artifact or _embedded_default()
        if verify_all:
            _verify(artifact)
        with _progress("bench") as progress:
            doc = run_bench(artifact, cfg, Path(prompts_file) if prompts_file else None, progress)
        table, lines, width = results_table(doc), ratio_lines(doc), 160

    if json_out:
        write_json(doc, Path(json_out))
    if plot_out:
        write_plot(doc, Path(plot_out))
    Console(width=width).print(table)
    for line in lines:
        click.echo(line)
    for what, path in (("JSON", json_out), ("plot", plot_out)):
        if path:
            click.echo(f"wrote {what} {path}")


@cli.command()
@click.argument("artifact", type=click.Path(), required=False)
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Quantized artifact folder to write.")
@click.option("--data", multiple=True, type=click.Path(),
              help="Calibration file, repeatable: text (one prompt per line), .jsonl ({\"text\"} or "
                   "{\"token_ids\"}) or .ids (token ids per line) [default, for an artifact with a tokenizer: the "
                   "Python stdlib's training split, the embedded model's own corpus].")  # fmt: skip
@click.option("--eval", "eval_data", multiple=True, type=click.Path(),
              help="Evaluation file(s) for the report [default: every 5th --data sequence, held out].")
@click.option("--scheme", default="int4", show_default=True, type=click.Choice(["int8", "fp8", "int4", "fp32"]),
              help="Trunk scheme; fp32 keeps the trunk, and so the output, exactly as exported (with --mtp-scheme: "
                   "cheaper drafts only).")  # fmt: skip
@click.option("--mtp-scheme", default=None, type=click.Choice(["int8", "fp8", "int4", "fp32"]),
              help="MTP graphs' scheme [default: as --scheme].")
@click.option("--method", default="minmax", show_default=True, type=click.Choice(["minmax", "entropy", "percentile"]),
              help="Activation ranges (int8, fp8).")
@click.option("--weight-method", default="gptq", show_default=True, type=click.Choice(["rtn", "gptq"]),
              help="int4 weights: round-to-nearest, or GPTQ on the calibration data (sequential: runs the "
                   "artifact's source checkpoint a layer at a time).")
@click.option("--block-size", type=int, default=64, show_default=True,
              help="int4: input channels per scale (fused experts take the largest size <= this that divides them).")
@click.option("--head-bits", type=int, default=8, show_default=True, help="int4: bits of the output head (4 or 8).")
@click.option("--samples", type=int, default=32, show_default=True, help="Calibration sequences.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per sequence (longer are cut).")
@click.option("--eval-samples", type=int, default=8, show_default=True, help="Evaluation sequences.")
@click.option("--min-top1", type=float, default=0.9, show_default=True,
              help="Refuse to write the artifact when the trunk's top-1 agreement with fp32 is lower.")
@click.option("--percentile", type=float, default=99.99, show_default=True, help="For --method percentile.")
@click.option("--threads", type=int, default=1, show_default=True, help="Intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the quality report as JSON.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
def calibrate(artifact, out, data, eval_data, scheme, mtp_scheme, method, weight_method, block_size, head_bits,
              samples, seq_len, eval_samples, min_top1, percentile, threads, as_json, force):  # fmt: skip
    """Quantize an fp32 ARTIFACT (default: the embedded model) with calibration data; print a quality report."""
    from pathlib import Path

    from nextn.calib.calibrate import CalibOptions, calibrate_artifact
    from nextn.calib.report import format_report

    opts = CalibOptions(scheme=scheme, mtp_scheme=mtp_scheme, method=method, weight_method=weight_method,
                        block_size=block_size, head_bits=head_bits, samples=samples, seq_len=seq_len,
                        eval_samples=eval_samples, min_top1=min_top1, percentile=percentile, threads=threads,
                        force=force)  # fmt: skip
    artifact = artifact or _embedded_artifact()
    with _progress("calibrate") as progress:
        manifest = calibrate_artifact(artifact, out, [Path(d) for d in data], [Path(e) for e in eval_data], opts,
                                      progress)  # fmt: skip
    rep = manifest["quantization"]["report"]
    click.echo(json.dumps(rep, indent=2) if as_json else format_report(rep))
    click.echo(f"wrote {out}", err=as_json)


@cli.command()
@click.argument("artifact", required=False, type=click.Path())
def verify(artifact):
    """Check every file of ARTIFACT (default: the embedded model as run opens it) against the sha256 in its
    manifest. Opening an artifact checks sizes and hashes only the files changed since they were last
    verified on this machine; this reads every byte."""
    artifact = artifact or _embedded_default()
    files, size = _verify(artifact)
    click.echo(f"{artifact}: {files} files, {_bytes(size)}: every sha256 matches its manifest")


def _verify(artifact: str) -> tuple[int, int]:
    """Every sha256 of an artifact, with a progress bar; a mismatch raises NextnError."""
    from nextn.export.manifest import read_manifest

    with _progress("verify") as progress:
        m = read_manifest(artifact, verify="full", progress=progress)
    return len(m["files"]), sum(f["bytes"] for f in m["files"].values())


def _embedded_artifact() -> str:
    """The embedded model's fp32 export (what calibrate quantizes)."""
    from nextn.embedded import embedded_artifact

    with _progress("export the embedded model (once)") as progress:
        return str(embedded_artifact(progress))


def _embedded_default() -> str:
    """The embedded model as run, bench, serve and verify take it by default: fp32 trunk, int4 drafts."""
    from nextn.embedded import embedded_default

    with _progress("prepare the embedded model (once)") as progress:
        return str(embedded_default(progress=progress))


@cli.command()
@click.option("--prompt", default=None, help="Prompt text [default: the start of a Python function].")
@click.option("--max-new-tokens", type=int, default=160, show_default=True)
@click.option("--draft", default="auto", show_default=True,
              help="The drafting run: auto (K chosen per step) or a fixed K >= 1.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed runs per mode (the median is shown).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="Intra-op threads of the trunk (the drafts run on one).")
@click.option("--quant", default=None, type=click.Choice(QUANT_SCHEMES),
              help="Run the embedded model quantized (nextn calibrate's defaults, once, cached) instead of fp32.")
@click.option("--drafts", default="int4", show_default=True, type=click.Choice(DRAFT_SCHEMES),
              help="Without --quant: the MTP graphs that draft (the trunk, and so the output, is fp32 either way).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def demo(prompt, max_new_tokens, draft, repeats, threads, quant, drafts, as_json):
    """Export the embedded model (cached), generate with drafting off and on, show acceptance and speedup."""
    from nextn.demo import DEFAULT_PROMPT, run_demo

    with _progress("demo") as progress:
        r = run_demo(prompt or DEFAULT_PROMPT, max_new_tokens, parse_draft("--draft", draft), repeats, threads, progress,
                     quant, drafts)  # fmt: skip
    if as_json:
        click.echo(json.dumps(r.to_dict()))
        return
    p, d = r.plain, r.drafted
    per_pos = _per_position(d, "{:.0%}")
    click.echo(f"artifact: {r.artifact}")
    click.echo(f"model:    {r.describe()}")
    click.echo("--- prompt ---")
    click.echo(r.prompt.rstrip("\n"))
    click.echo("--- greedy continuation " + ("(identical with and without drafting) ---" if r.identical
                                           else "(DIFFERS between the two runs: please report) ---"))  # fmt: skip
    click.echo(r.text)
    click.echo("---")
    click.echo(f"drafting off:      {p['tokens_per_s']:8.1f} tok/s  TPOT {p['tpot_ms']:.2f} ms  "
               f"({p['new_tokens']} tokens, median of {repeats} runs)")  # fmt: skip
    label = f"drafting {'auto' if r.draft == 'auto' else f'K={r.draft}'}:"
    click.echo(f"{label:<19}{d['tokens_per_s']:8.1f} tok/s  TPOT {d['tpot_ms']:.2f} ms  "
               f"acceptance per position [{per_pos}], mean acceptance length {d['mean_acceptance_length']:.2f}")  # fmt: skip
    if r.draft == "auto":
        hist = ", ".join(f"K={k}: {n}" for k, n in d["draft_histogram"].items())
        click.echo(f"                   steps per K chosen [{hist}]")
        if d["draft_histogram"].get("0", 0) >= 0.9 * d["steps"] and r.step_cost:
            hint = "" if r.quant else "; see `nextn demo --quant int8`"
            click.echo(f"                   drafting does not pay for this artifact on this machine: a step drafting "
                       f"1 token costs {r.step_cost[1]:.2f} plain steps (2: {r.step_cost[min(2, len(r.step_cost) - 1)]:.2f}),"
                       f" so auto keeps plain decoding{hint}")  # fmt: skip
    click.echo(f"speedup (TPOT):    {r.speedup:.2f}x")
    if not r.identical:
        raise NextnError("drafting changed the greedy output")


@cli.command()
@click.argument("artifact", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-batch", type=int, default=16, show_default=True, help="Sequences decoded together.")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Requests waiting for a batch slot; past it a request gets 429.")
@click.option("--draft", default="auto", show_default=True, help="auto or a fixed K, for requests that do not say.")
@click.option("--prefill-chunk", type=int, default=256, show_default=True,
              help="Prompt tokens prefilled per step over all joining requests: lower keeps inter-token latency "
                   "of running requests lower, higher gets first tokens sooner.")  # fmt: skip
@click.option("--model-name", default=None, help="The name clients ask for [default: the artifact's folder name].")
@click.option("--backend", default="ort", show_default=True, help="ort or torch.")
@click.option("--threads", type=int, default=0,
              help="Intra-op threads of the trunk (0: the backend's default; with --replicas, the cores split evenly); "
                   "the MTP drafts run on one.")
@click.option("--replicas", type=int, default=0,
              help="Serve N replicas as a Ray Serve deployment (each its own engine) [default: no Ray, one engine].")
@click.option("--ray-address", default=None, help="With --replicas: join this Ray cluster [default: start a local one].")
@_verify_option
def serve(artifact, host, port, max_batch, max_queue, draft, prefill_chunk, model_name, backend, threads, replicas,
          ray_address, verify_all):  # fmt: skip
    """Serve an ARTIFACT (default: the embedded model) over an OpenAI-compatible HTTP API with continuous
    batching: POST /v1/completions, GET /v1/models, /health, /metrics."""
    from nextn.serve.app import ServeConfig, serve as run_server

    if max_batch < 1:
        raise NextnError(f"--max-batch {max_batch}: must be >= 1")
    if max_queue < 0:
        raise NextnError(f"--max-queue {max_queue}: must be >= 0")
    if not 0 <= port <= 65535:
        raise NextnError(f"--port {port}: must be in [0, 65535]")
    if replicas < 0:
        raise NextnError(f"--replicas {replicas}: must be >= 1 (or 0: no Ray)")
    if prefill_chunk < 1:
        raise NextnError(f"--prefill-chunk {prefill_chunk}: must be >= 1")
    if ray_address and not replicas:
        raise NextnError("--ray-address: give --replicas N too")
    from nextn.embedded import EMBEDDED_NAME

    name = model_name or (Path(artifact).resolve().name if artifact else EMBEDDED_NAME)
    artifact = artifact or _embedded_default()
    if verify_all:
        _verify(artifact)
    config = ServeConfig(name, max_batch, max_queue, parse_draft("--draft", draft), prefill_chunk)
    ready = lambda url: click.echo(f"nextn: serving {name} on {url} (Ctrl-C stops)", err=True)  # noqa: E731
    try:
        if replicas:
            from nextn.serve.ray_app import serve_on_ray

            serve_on_ray(artifact, host, port, config, replicas, ray_address, backend, threads, ready)
        else:
            run_server(artifact, host, port, config, backend=backend, threads=threads, on_ready=ready)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on, after the model was closed
        pass
    click.echo("nextn: server stopped", err=True)


class _progress:
    """A rich progress bar on stderr when it is a terminal; a no-op callback otherwise."""

    def __init__(self, title: str):
        self.title = title
        self.bar = None

    def __enter__(self):
        import sys

        if not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), console=Console(stderr=True), transient=True)  # fmt: skip
        self.bar.start()
        task = self.bar.add_task(self.title, total=None)

        def update(what: str, step: int, total: int) -> None:
            self.bar.update(task, description=f"{self.title}: {what}", completed=step - 1, total=total)

        return update

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def main() -> None:
    """Entry point: click's usage errors and NextnError alike end as one line and a non-zero exit."""
    import sys

    try:
        cli.main(prog_name="nextn", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"Error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
