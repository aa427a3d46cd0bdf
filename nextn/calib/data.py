"""Calibration and evaluation data: files in, token-id sequences out.

Accepted files (each line one sequence; blank lines skipped):
  *.jsonl   {"text": ...}, {"prompt": ...} or {"token_ids": [...]} per line
  *.ids     token ids separated by spaces or commas
  other     text, one prompt per line ("\\n" inside a line is a newline)

Without files the embedded model calibrates on its own training split of the Python standard library
and is evaluated on the held-out split (the files it never saw).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nextn.errors import NextnError


@dataclass(frozen=True)
class Sequences:
    ids: list[list[int]]
    source: str  # what they came from, for the report

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.ids)


def read_sequences(files: list[Path], tokenizer, vocab: int, seq_len: int, flag: str = "--data") -> list[list[int]]:
    """Every sequence of `files`, each cut to `seq_len` tokens; ids checked against the vocabulary."""
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
            if len(ids) >= 2:  # one token has no next-token prediction to calibrate or score
                out.append(ids[:seq_len])
                found += 1
        if not found:
            raise NextnError(f"{flag} {path}: no sequence of 2 or more tokens in the file")
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


def calibration_and_eval(
    data: list[Path], eval_data: list[Path], tokenizer, vocab: int, samples: int, seq_len: int,
    eval_samples: int,
) -> tuple[Sequences, Sequences]:  # fmt: skip
    """(calibration, evaluation) sequences.

    Evaluation: `eval_data` when given; else every fifth sequence of `data` is held out (when there are
    at least two); with no data at all, the stdlib splits (the embedded model's own corpus).
    """
    if samples < 1:
        raise NextnError(f"--samples {samples}: must be >= 1")
    if seq_len < 2:
        raise NextnError(f"--seq-len {seq_len}: must be >= 2")
    if data:
        seqs = read_sequences(data, tokenizer, vocab, seq_len)
        held = [s for i, s in enumerate(seqs) if i % 5 == 4] if len(seqs) >= 2 and not eval_data else []
        calib = [s for i, s in enumerate(seqs) if not (held and i % 5 == 4)][:samples]
        names = ", ".join(str(p) for p in data)
        cal = Sequences(calib, names)
        if eval_data:
            ev = Sequences(read_sequences(eval_data, tokenizer, vocab, seq_len, "--eval")[:eval_samples],
                           ", ".join(str(p) for p in eval_data))  # fmt: skip
        elif held:
            ev = Sequences(held[:eval_samples], f"every 5th sequence of {names} (not calibrated on)")
        else:
            ev = Sequences(calib[:eval_samples], f"{names} (the calibration data itself: only one sequence)")
        return cal, ev
    if tokenizer is None:
        raise NextnError("--data: this artifact has no tokenizer, give calibration token ids (.ids or jsonl)")
    cal = Sequences(stdlib_sequences(tokenizer, "train", samples, seq_len), "Python stdlib, training split")
    if eval_data:
        ev = Sequences(read_sequences(eval_data, tokenizer, vocab, seq_len, "--eval")[:eval_samples],
                       ", ".join(str(p) for p in eval_data))  # fmt: skip
    else:
        ev = Sequences(stdlib_sequences(tokenizer, "heldout", eval_samples, seq_len), "Python stdlib, held-out split")
    if not cal.ids or not ev.ids:
        raise NextnError("--data: no stdlib file is long enough for --seq-len; give calibration data")
    return cal, ev
