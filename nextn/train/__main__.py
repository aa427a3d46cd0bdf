"""python -m nextn.train OUT [--preset embedded|tiny] [--steps N] [--seed S] [--vocab V]"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import click


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["embedded", "tiny"]), default="embedded", show_default=True)
@click.option("--steps", type=int, default=None, help="Override the preset's number of steps.")
@click.option("--vocab", type=int, default=2048, show_default=True, help="BPE vocabulary size.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-files", type=int, default=None, help="Use only the first N training files (tests).")
def main(out: Path, preset: str, steps: int | None, vocab: int, seed: int, max_files: int | None) -> None:
    """Train a DeepSeek-V3-style model with MTP modules on the Python standard library; write it to OUT."""
    import dataclasses

    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from nextn.train.corpus import BOS, EOS, encode_files, stdlib_corpus, train_tokenizer
    from nextn.train.trainer import PRESETS, save_checkpoint, train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(seed)
    corpus = stdlib_corpus()
    files = corpus.train[:max_files] if max_files else corpus.train
    heldout = corpus.heldout[: max(2, max_files // 10)] if max_files else corpus.heldout
    click.echo(f"corpus: {len(files)} training files, {len(heldout)} held out, from {corpus.root}", err=True)
    tok = train_tokenizer(files, vocab)
    train_stream, heldout_stream = encode_files(tok, files), encode_files(tok, heldout)
    click.echo(f"tokens: {len(train_stream):,} train, {len(heldout_stream):,} held out", err=True)

    tc = PRESETS[preset](tok.get_vocab_size())
    tc = dataclasses.replace(tc, seed=seed, steps=steps if steps is not None else tc.steps)
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=None, disable=not sys.stderr.isatty()) as bar:  # fmt: skip
        task = bar.add_task("", total=tc.steps)

        def on_step(step: int, row: dict) -> None:
            bar.update(task, advance=1, description=f"loss {row['trunk']:.3f} mtp {[round(m, 3) for m in row['mtp']]}")
            if not sys.stderr.isatty() and (step % 50 == 0 or step == tc.steps - 1):
                click.echo(f"step {step} {json.dumps(row)}", err=True)

        model, history = train(tc, train_stream, heldout_stream, on_step)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".nextn-train-", dir=out.parent))
    try:
        save_checkpoint(model, tmp)
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": BOS}, indent=2) + "\n")
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
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    click.echo(json.dumps({"heldout_loss": history["heldout"], "train_seconds": round(history["train_seconds"], 1)}))


if __name__ == "__main__":
    main()
