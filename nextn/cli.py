"""The `nextn` command. Each subcommand parses, calls one library function, and prints."""

from __future__ import annotations

import json
import logging

import click

from nextn.errors import NextnError


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
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(path: str, as_json: bool) -> None:
    """Summarize a checkpoint folder (config, parameters, dtypes, MTP depth, KV-cache size) or an
    exported artifact (graphs, their inputs and outputs, files, validation)."""
    from pathlib import Path

    from nextn.export.manifest import MANIFEST

    if (Path(path) / MANIFEST).is_file():
        from nextn.export.summary import format_artifact, summarize_artifact

        summary = summarize_artifact(path)
        click.echo(json.dumps(summary, indent=2) if as_json else format_artifact(summary))
        return
    from nextn.model.summary import summarize_checkpoint

    summary = summarize_checkpoint(path)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Artifact folder to write.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--mtp-layers", type=int, default=None, help="MTP modules to export [default: all].")
@click.option("--opset", type=int, default=23, show_default=True)
@click.option("--attention", type=click.Choice(["absorbed", "naive"]), default="absorbed", show_default=True,
              help="MLA form in the graphs (BENCHMARKS.md measures both).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
def export(checkpoint: str, out: str, dtype: str, mtp_layers: int | None, opset: int, attention: str, force: bool):
    """Export the trunk and each MTP module of CHECKPOINT as validated ONNX graphs."""
    from nextn.export.exporter import ExportOptions, export_checkpoint
    from nextn.export.summary import format_validation

    opts = ExportOptions(dtype=dtype, mtp_layers=mtp_layers, opset=opset, attention=attention, force=force)
    with _progress("export") as progress:
        manifest = export_checkpoint(checkpoint, out, opts, progress)
    click.echo(format_validation(manifest))
    w = manifest["weights"]
    click.echo(f"wrote {out}: {', '.join(manifest['graphs'])}; weights.bin {_bytes(w['bytes'])} "
               f"({len(w['shared'])} tensor(s) shared between graphs)")  # fmt: skip


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt", help="Prompt text (needs the artifact's tokenizer.json).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--draft", type=int, default=0, show_default=True, help="Tokens drafted by the MTP modules per step.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--backend", default="ort", show_default=True, help="ort or torch.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--threads", type=int, default=0, help="Intra-op threads (0: the backend's default).")
@click.option("--prepack", is_flag=True, help="ONNX Runtime pre-packs weights per graph: faster, more memory.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def run(artifact, prompt, prompt_ids, max_new_tokens, draft, temperature, top_k, top_p, seed, stop, backend,
        device, threads, prepack, as_json):  # fmt: skip
    """Generate from an exported ARTIFACT: text streams to stdout, stats go to stderr."""
    import sys

    import nextn

    if (prompt is None) == (prompt_ids is None):
        raise NextnError("give exactly one of --prompt and --prompt-ids")
    if prompt_ids is not None:
        try:
            prompt = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise NextnError(f"--prompt-ids {prompt_ids!r}: expected comma-separated integers") from None
    kwargs = dict(max_new_tokens=max_new_tokens, draft=draft, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=seed, stop=list(stop) or None)  # fmt: skip
    with nextn.load(artifact, backend=backend, device=device, threads=threads, prepack=prepack) as model:
        if as_json:
            click.echo(json.dumps(model.generate(prompt, **kwargs).to_dict()))
            return
        for piece in model.generate(prompt, stream=True, **kwargs):
            click.echo(piece.text if model.tokenizer else " ".join(map(str, piece.token_ids)) + " ", nl=False)
            sys.stdout.flush()
        click.echo()
    click.echo(_format_stats(model.last_stats), err=True)


def _format_stats(s: dict) -> str:
    per_pos = ", ".join(f"{a:.2f}" for a in s["accepted_per_position"]) or "-"
    t = s["time_ms"]
    return (f"{s['new_tokens']} tokens, TTFT {s['ttft_ms']:.1f} ms, TPOT {s['tpot_ms']:.2f} ms, "
            f"{s['tokens_per_s']:.1f} tok/s; {s['steps']} verify steps, acceptance per position [{per_pos}], "
            f"mean acceptance length {s['mean_acceptance_length']:.2f}; time trunk {t['trunk']:.0f} ms, "
            f"MTP {t['mtp']:.0f} ms, host {t['host']:.0f} ms")  # fmt: skip


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
