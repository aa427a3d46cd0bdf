"""The Python API: `nextn.load(artifact).generate(...)`.

    import nextn
    with nextn.load("artifact", backend="ort") as model:
        result = model.generate("def fib(n):", max_new_tokens=64)      # draft="auto": K chosen per step
        print(result.text, result.stats["mean_acceptance_length"])
        for piece in model.generate("import os", max_new_tokens=32, draft=2, stream=True):
            print(piece.text, end="")
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nextn.errors import NextnError
from nextn.runtime.decoder import AUTO, Decoder
from nextn.runtime.engines import open_engines
from nextn.runtime.sampling import AcceptRule, SamplingParams


@dataclass
class Result:
    token_ids: list[int]  # the new tokens only
    text: str | None  # None without a tokenizer
    stats: dict

    def to_dict(self) -> dict:
        return {"token_ids": self.token_ids, "text": self.text, "stats": self.stats}


@dataclass
class Piece:
    """One streamed chunk: the tokens accepted in one step and their text."""

    token_ids: list[int]
    text: str


class Model:
    def __init__(self, artifact: str | Path, backend: str = "ort", device: str = "cpu", threads: int = 0,
                 prepack: bool | None = None):  # fmt: skip
        self.engines = open_engines(artifact, backend=backend, device=device, threads=threads, prepack=prepack)
        self.decoder = Decoder(self.engines)
        m = self.engines.manifest
        self.eos_ids = tuple(m["eos_token_ids"])
        self.tokenizer = None
        self.last_stats: dict | None = None  # of the last generation (streaming included)
        if m.get("tokenizer"):
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(Path(artifact) / m["tokenizer"]))

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise NextnError("this artifact has no tokenizer.json: pass token ids (--prompt-ids)")
            return self.tokenizer.encode(prompt).ids
        vocab = self.engines.manifest["config"]["vocab_size"]
        bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise NextnError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        return list(prompt)

    def decode(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids)

    def generate(
        self,
        prompt: str | list[int] | list[str] | list[list[int]],
        max_new_tokens: int = 64,
        draft: int | str = AUTO,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        stream: bool = False,
        accept: str = "exact",
        relaxed_top: int | None = None,
        relaxed_delta: float | None = None,
    ) -> Result | list[Result] | Iterator[Piece]:
        """Generate from one prompt (text or token ids) or a batch of them (a list of prompts).

        Greedy when temperature is 0. `draft`: "auto" (the default: before each step a controller picks
        the K that maximizes expected tokens per ms from measured costs and acceptance, 0 where drafting
        does not pay) or a fixed K tokens drafted by the MTP modules per step (0: off). Every K is
        lossless. A batch shares each trunk pass (batch.py); each result equals running that prompt alone
        (greedy; sampled rows draw alike at a fixed K). `accept="relaxed"` (greedy only, lossy, opt-in)
        also accepts a draft in the target's `relaxed_top` (3) tokens within `relaxed_delta` (0.5) of its top
        log-prob.
        """
        params = SamplingParams(temperature, top_k, top_p, seed)
        params.check()
        rule = AcceptRule.from_options(accept, relaxed_top, relaxed_delta)
        if max_new_tokens < 1:
            raise NextnError(f"max_new_tokens {max_new_tokens}: must be >= 1")
        batch = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
        if batch:
            if stream:
                raise NextnError("stream=True takes one prompt, not a batch")
            from nextn.runtime.batch import generate_batch

            out = generate_batch(self.decoder, [self.encode(p) for p in prompt], max_new_tokens, draft, params,
                                 self.eos_ids, self._stop_fn(stop), rule)  # fmt: skip
            return [Result(ids, self.decode(ids), stats.to_dict()) for ids, stats in out]
        if stream:
            return self._stream(prompt, max_new_tokens, draft, params, stop, rule)
        return self._one(prompt, max_new_tokens, draft, params, stop, None, rule)

    def _stop_fn(self, stop: list[str] | None):
        if not stop:
            return None
        if self.tokenizer is None:
            raise NextnError("stop strings need the artifact's tokenizer.json")

        def cut(new: list[int]) -> int | None:
            text = self.tokenizer.decode(new)
            if not any(s in text for s in stop):
                return None
            for i in range(1, len(new) + 1):  # the shortest prefix whose text holds a stop string
                if any(s in self.tokenizer.decode(new[:i]) for s in stop):
                    return i
            return None

        return cut

    def _one(self, prompt, max_new_tokens, draft, params, stop, on_tokens, rule) -> Result:
        ids, stats = self.decoder.generate(self.encode(prompt), max_new_tokens, draft, params, self.eos_ids,
                                           self._stop_fn(stop), on_tokens, rule)  # fmt: skip
        self.last_stats = stats.to_dict()
        return Result(ids, self.decode(ids), self.last_stats)

    def _stream(self, prompt, max_new_tokens, draft, params, stop, rule) -> Iterator[Piece]:
        # The decoder calls back per step; a thread-free generator needs the pieces collected per step.
        import queue
        import threading

        q: queue.Queue = queue.Queue()
        error: list[BaseException] = []

        def work():
            try:
                self._one(prompt, max_new_tokens, draft, params, stop, lambda ids: q.put(ids), rule)
            except BaseException as e:  # surfaced in the consumer
                error.append(e)
            finally:
                q.put(None)

        threading.Thread(target=work, daemon=True).start()
        while (ids := q.get()) is not None:
            yield Piece(ids, self.decode(ids) or "")
        if error:
            raise error[0]

    def close(self) -> None:
        self.decoder.close()  # saves the refined step costs for the next process
        self.engines.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(artifact: str | Path, backend: str = "ort", device: str = "cpu", threads: int = 0,
         prepack: bool | None = None) -> Model:  # fmt: skip
    """Open an exported artifact for generation (`prepack`: see engines.SharedWeights)."""
    return Model(artifact, backend=backend, device=device, threads=threads, prepack=prepack)
