"""Training text that every machine has offline: the Python standard library's own source.

Files are split into train and held-out by a hash of their path relative to the stdlib root, so the
split does not depend on the order files are listed in, and a held-out file is never seen in training.
Tokenizer: byte-level BPE trained with `tokenizers` on the training split only.
"""

from __future__ import annotations

import logging
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EOS = "<|eos|>"  # id 0: separates files; the model's end-of-sequence
BOS = "<|bos|>"  # id 1
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}


@dataclass(frozen=True)
class Corpus:
    train: list[Path]
    heldout: list[Path]
    root: Path


def stdlib_corpus(root: Path | None = None, heldout_every: int = 20, max_bytes: int = 400_000) -> Corpus:
    """Every .py file under the stdlib (test suites and site-packages excluded); 1 in `heldout_every`
    held out. Files over `max_bytes` (generated tables) are left out."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train, heldout = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or path.stat().st_size > max_bytes:
            continue
        (heldout if zlib.crc32(str(rel).encode()) % heldout_every == 0 else train).append(path)
    if not train or not heldout:
        raise RuntimeError(f"no Python source found under {root}")
    return Corpus(train, heldout, root)


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenization, no added prefix space), EOS = 0, BOS = 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_text(f) for f in files), trainer=trainer)
    return tok


def encode_files(tok, files: list[Path]) -> np.ndarray:
    """One token stream [N] uint16: each file's tokens followed by EOS."""
    eos = tok.token_to_id(EOS)
    parts = []
    batch = 256
    for i in range(0, len(files), batch):
        for enc in tok.encode_batch([read_text(f) for f in files[i : i + batch]]):
            parts.append(np.asarray(enc.ids, dtype=np.uint16))
            parts.append(np.asarray([eos], dtype=np.uint16))
    return np.concatenate(parts)
