"""Calibration and evaluation data for `nextn calibrate` (file formats: nextn/prompts.py).

Without files the embedded model calibrates on its own training split of the Python standard library
and is evaluated on the held-out split (the files it never saw).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nextn.errors import NextnError
from nextn.prompts import read_sequences, stdlib_sequences


@dataclass(frozen=True)
class Sequences:
    ids: list[list[int]]
    source: str  # what they came from, for the report

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.ids)


def calibration_and_eval(
    data: list[Path], eval_data: list[Path], tokenizer, vocab: int, samples: int, seq_len: int,
    eval_samples: int,
) -> tuple[Sequences, Sequences]:  # fmt: skip
    """(calibration, evaluation) sequences.

    Evaluation: `eval_data` when given; else every fifth sequence of `data` is held out (the last one
    when there are two to four; with one, it is evaluated on itself); with no data at all, the stdlib
    splits (the embedded model's own corpus).
    """
    if samples < 1:
        raise NextnError(f"--samples {samples}: must be >= 1")
    if seq_len < 2:
        raise NextnError(f"--seq-len {seq_len}: must be >= 2")
    ev = None
    if data:
        seqs = read_sequences(data, tokenizer, vocab, seq_len, "--data", min_tokens=2)  # 2: one next-token pair
        # every 5th sequence held out (the last one when there are 2 to 4)
        held_idx = (set(range(4, len(seqs), 5)) or {len(seqs) - 1}) if len(seqs) >= 2 and not eval_data else set()
        names = ", ".join(str(p) for p in data)
        cal = Sequences([s for i, s in enumerate(seqs) if i not in held_idx][:samples], names)
        held = [s for i, s in enumerate(seqs) if i in held_idx]
        if held:
            ev = Sequences(held[:eval_samples], f"every 5th sequence of {names} (not calibrated on)")
        elif not eval_data:
            ev = Sequences(cal.ids[:eval_samples], f"{names} (the calibration data itself: only one sequence)")
    else:
        if tokenizer is None:
            raise NextnError("--data: this artifact has no tokenizer, give calibration token ids (.ids or jsonl)")
        cal = Sequences(stdlib_sequences(tokenizer, "train", samples, seq_len), "Python stdlib, training split")
        if not eval_data:
            ev = Sequences(stdlib_sequences(tokenizer, "heldout", eval_samples, seq_len), "Python stdlib, held-out split")
        if not cal.ids or (ev is not None and not ev.ids):
            raise NextnError("--data: no stdlib file is long enough for --seq-len; give calibration data")
    if eval_data:
        ev = Sequences(read_sequences(eval_data, tokenizer, vocab, seq_len, "--eval", min_tokens=2)[:eval_samples],
                       ", ".join(str(p) for p in eval_data))  # fmt: skip
    return cal, ev
