"""Prompt and sequence files, shared by `nextn bench --prompts` and `nextn calibrate --data/--eval`.

Accepted files (each line one sequence; blank lines skipped):
  *.jsonl   {"text": ...}, {"prompt": ...} or {"token_ids": [...]} per line
  *.ids     token ids separated by spaces or commas
  other     text, one prompt per line ("\\n" inside a line is a newline)

Without a file, the Python standard library's own source stands in (`stdlib_sequences`): its held-out
split is text the embedded model never trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from nextn.errors import NextnError


def read_sequences(files: list[Path], tokenizer, vocab: int, seq_len: int, flag: str, min_tokens: int = 1) -> list[list[int]]:
    """Every sequence of `files` with at least `min_tokens` tokens, each cut to `seq_len`; ids checked
    against the vocabulary."""
    out: list[list[int]] = []
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise NextnError(f"{flag} {path}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise NextnError(f"{flag} {path}: not UTF-8 text (text, .jsonl or .ids files)") from None
        found = 0
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            ids = _parse_line(path, i, line, tokenizer, flag)
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise NextnError(f"{flag} {path}:{i}: token id {bad} is outside the model's vocabulary [0, {vocab})"
                                 " (data made with another tokenizer?)")  # fmt: skip
            if len(ids) >= min_tokens:
                out.append(ids[:seq_len])
                found += 1
        if not found:
            raise NextnError(f"{flag} {path}: no sequence of {min_tokens} or more tokens in the file")
    return out


def _parse_line(path: Path, i: int, line: str, tokenizer, flag: str) -> list[int]:
    if path.suffix == ".ids":
        try:
            return [int(t) for t in line.replace(",", " ").split()]
        except ValueError:
            raise NextnError(f"{flag} {path}:{i}: expected token ids separated by spaces or commas") from None
    if path.suffix == ".jsonl":
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise NextnError(f"{flag} {path}:{i}: not JSON ({e.msg})") from None
        if isinstance(rec, dict) and isinstance(rec.get("token_ids"), list):
            try:
                return [int(t) for t in rec["token_ids"]]
            except (TypeError, ValueError):
                raise NextnError(f"{flag} {path}:{i}: token_ids must be integers") from None
        text = rec.get("text", rec.get("prompt")) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise NextnError(f'{flag} {path}:{i}: expected {{"text": ...}}, {{"prompt": ...}} or {{"token_ids": [...]}}')
    else:
        text = line.replace("\\n", "\n")
    if tokenizer is None:
        raise NextnError(f"{flag} {path}: text needs the artifact's tokenizer.json (give token ids: .ids or jsonl)")
    return tokenizer.encode(text).ids


def stdlib_sequences(tokenizer, split: str, n: int, seq_len: int) -> list[list[int]]:
    """The first `seq_len` tokens of the first `n` stdlib files of a split ("train" or "heldout") long
    enough to give them."""
    from nextn.train.corpus import read_text, stdlib_corpus

    corpus = stdlib_corpus()
    out = []
    for f in getattr(corpus, split):
        ids = tokenizer.encode(read_text(f)).ids
        if len(ids) >= seq_len:
            out.append(ids[:seq_len])
        if len(out) == n:
            break
    return out
