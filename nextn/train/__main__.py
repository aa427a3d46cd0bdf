"""python -m nextn.train OUT [--preset embedded|tiny] [--steps N] [--distill-steps N] [--from CKPT] [--seed S]
                           [--distill-batch B] [--distill-greedy F] [--device auto|cpu|cuda] [--corpus-root DIR]

Stage 1 trains trunk and MTP modules jointly (DeepSeek-V3's objective) and saves them; stage 2 reloads
the saved weights and distills the trunk's predictions into the MTP modules (trunk frozen). `--from CKPT`
runs stage 2 alone on a stage-1 checkpoint, which is exactly what the full run does after stage 1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import click
import numpy as np


def _bar(title: str, total: int, tag: str, describe):
    """A rich progress bar on a terminal (a JSON line every 50 steps otherwise) and its per-step callback;
    `describe(row)` is the bar's text for a step's record."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    tty = sys.stderr.isatty()
    bar = Progress(TextColumn(title), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   disable=not tty)  # fmt: skip
    task = bar.add_task("", total=total)

    def on_step(step: int, row: dict) -> None:
        bar.update(task, advance=1, description=describe(row))
        if not tty and (step % 50 == 0 or step == total - 1):
            click.echo(f"{tag} {step} {json.dumps(row)}", err=True)

    return bar, on_step


def _device(name: str) -> str:
    """--device: auto (cuda when torch has it), or a device torch can use here; else a one-line error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"{name!r}: expected auto, cpu, cuda or cuda:N", param_hint="--device")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise click.BadParameter(f"{name!r}: torch {torch.__version__} sees no such CUDA device", param_hint="--device")
    return name


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["embedded", "tiny"]), default="embedded", show_default=True)
@click.option("--steps", type=int, default=None, help="Override the preset's stage-1 steps.")
@click.option("--distill-steps", type=int, default=None, help="Override the preset's stage-2 steps (0: none).")
@click.option("--from", "from_ckpt", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Skip stage 1: distill the MTP modules of this stage-1 checkpoint.")
@click.option("--vocab", type=int, default=2048, show_default=True, help="BPE vocabulary size.")
@click.option("--distill-batch", type=click.IntRange(min=1), default=None, help="Override stage 2's windows per step.")
@click.option("--distill-greedy", type=click.FloatRange(0.0, 1.0), default=None,
              help="Share of each stage-2 batch from the trunk's own greedy continuations.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when available), cpu, cuda, cuda:N.")
@click.option("--corpus-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A Python standard library to read (default: this interpreter's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-files", type=int, default=None, help="Use only the first N training files (tests).")
def main(out: Path, preset: str, steps: int | None, distill_steps: int | None, from_ckpt: Path | None,
         distill_batch: int | None, distill_greedy: float | None, device: str, corpus_root: Path | None, vocab: int,
         seed: int, max_files: int | None) -> None:  # fmt: skip
    """Train a DeepSeek-V3-style model with MTP modules on the Python standard library; write it to OUT."""
    import torch

    from nextn.model.weights import load_model
    from nextn.train.corpus import BOS, EOS, encode_files, stdlib_corpus, train_tokenizer
    from nextn.train.trainer import (
        PRESETS, distill_mtp, draft_agreement, evaluate, greedy_windows, heldout_windows, save_checkpoint, train,
    )  # fmt: skip

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(seed)
    device = _device(device)
    corpus = stdlib_corpus(corpus_root)
    files = corpus.train[:max_files] if max_files else corpus.train
    heldout = corpus.heldout[: max(2, max_files // 10)] if max_files else corpus.heldout
    click.echo(f"corpus: {len(files)} training files, {len(heldout)} held out, from {corpus.root}", err=True)
    if from_ckpt is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(from_ckpt / "tokenizer.json"))
        summary = json.loads((from_ckpt / "training.json").read_text())
    else:
        tok = train_tokenizer(files, vocab)
    train_stream, heldout_stream = encode_files(tok, files), encode_files(tok, heldout)
    click.echo(f"tokens: {len(train_stream):,} train, {len(heldout_stream):,} held out", err=True)

    tc = PRESETS[preset](tok.get_vocab_size())
    overrides = {"steps": steps, "distill_steps": distill_steps, "distill_batch": distill_batch,
                 "distill_greedy": distill_greedy}  # fmt: skip
    tc = dataclasses.replace(tc, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".nextn-train-", dir=out.parent))
    try:
        if from_ckpt is None:
            bar, on_step = _bar("stage 1: trunk + MTP", tc.steps, "step",
                                lambda row: f"loss {row['trunk']:.3f} mtp {[round(m, 3) for m in row['mtp']]}")
            with bar:
                model, history = train(tc, train_stream, heldout_stream, on_step, device)
            save_checkpoint(model, tmp)
            summary = {
                "command": "python -m nextn.train " + " ".join(sys.argv[1:]),
                "corpus": {"root": str(corpus.root), "python": sys.version.split()[0], "train_files": len(files),
                           "heldout_files": len(heldout), "train_tokens": int(len(train_stream)),
                           "heldout_tokens": int(len(heldout_stream))},
                "train": {k: v for k, v in dataclasses.asdict(tc).items() if k != "model"},
                "heldout_loss": history["heldout"], "initial_heldout_loss": history["start_heldout"],
                "final_train_loss": history["steps"][-1], "train_seconds": round(history["train_seconds"], 1),
                "torch": torch.__version__,
            }  # fmt: skip
        else:
            for f in ("config.json", "generation_config.json", "model.safetensors"):
                shutil.copyfile(from_ckpt / f, tmp / f)

        if tc.distill_steps:
            # Stage 2 always starts from the saved (bf16) stage-1 weights, so `--from` reproduces it.
            model = load_model(tmp)[0].to(device)
            # Greedy acceptance along the trunk's own continuations of held-out prompts, before and after.
            probe = greedy_windows(model, heldout_stream, tc.eval_windows, tc.seq_len, np.random.default_rng(tc.seed + 3))
            before = draft_agreement(model, probe)
            bar, on_distill = _bar("stage 2: distill MTP", tc.distill_steps, "distill",
                                   lambda row: f"vs trunk {[round(m, 3) for m in row['mtp_vs_trunk']]}")
            with bar:
                dist = distill_mtp(model, train_stream, tc, on_distill)
            after = draft_agreement(model, probe)
            save_checkpoint(model, tmp)
            if "distill" in summary:  # an earlier stage 2 of the --from checkpoint: kept, numbered
                summary[f"distill_{sum(k.startswith('distill_') for k in summary)}"] = summary.pop("distill")
            summary["distill"] = {
                "command": "python -m nextn.train " + " ".join(sys.argv[1:]), "steps": tc.distill_steps,
                "lr": tc.distill_lr, "batch": tc.distill_batch, "greedy": tc.distill_greedy,
                "greedy_windows": dist["greedy_windows"], "device": device, "torch": torch.__version__,
                "final_mtp_vs_trunk_ce": dist["steps"][-1]["mtp_vs_trunk"],
                "heldout_loss": evaluate(model, heldout_windows(tc, heldout_stream)),
                "heldout_greedy_agreement": {"before": before, "after": after},
                "greedy_seconds": round(dist["greedy_seconds"], 1), "train_seconds": round(dist["train_seconds"], 1),
            }  # fmt: skip
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": BOS}, indent=2) + "\n")
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    click.echo(json.dumps({"heldout_loss": summary["heldout_loss"], "distill": summary.get("distill")}))


if __name__ == "__main__":
    main()
