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
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


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
    """Summarize a DeepSeek-V3 checkpoint folder: config, parameters, dtypes, MTP depth, KV-cache size."""
    from nextn.model.summary import summarize_checkpoint

    summary = summarize_checkpoint(path)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


def main() -> None:
    cli(prog_name="nextn")


if __name__ == "__main__":
    main()
