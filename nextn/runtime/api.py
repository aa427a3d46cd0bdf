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
from nextn.runtime.engine import Request, StepEngine
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
    """One streamed chunk: the tokens that became final in one step and their text. The last piece of a
    stream carries why it ended and the stats (its token_ids may be empty)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the last piece
    stats: dict | None = None  # on the last piece


class Model:
    def __init__(self, artifact: str | Path, backend: str = "ort", device: str = "cpu", threads: int = 0,
                 prepack: bool | None = None, verify: bool | str = True):  # fmt: skip
        self.engines = open_engines(artifact, backend=backend, device=device, threads=threads, prepack=prepack,
                                    verify=verify)  # fmt: skip
        self.decoder = Decoder(self.engines)
        m = self.engines.manifest
        self.eos_ids = tuple(m["eos_token_ids"])
        self.tokenizer = None
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
        lossless. A batch shares each trunk pass (engine.py); each result equals running that prompt alone
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
        if batch and stream:
            raise NextnError("stream=True takes one prompt, not a batch")
        request = self.request(prompt[0] if batch else prompt, max_new_tokens, draft, params, stop, rule)
        if stream:
            return self._stream(request)
        prompts = [self.encode(p) for p in prompt] if batch else [request.prompt]
        out = self.decoder.generate_many(prompts, max_new_tokens, draft, params, self.eos_ids, request.stop, rule)
        results = [Result(ids, self.decode(ids), stats.to_dict()) for ids, stats in out]
        return results if batch else results[0]

    def request(self, prompt: str | list[int], max_new_tokens: int, draft: int | str, params: SamplingParams,
                stop: list[str] | None, rule: AcceptRule) -> Request:  # fmt: skip
        """A step-engine request (engine.py) for one prompt, checked: a bad one raises NextnError."""
        req = Request(self.encode(prompt), max_new_tokens, draft, params, self.eos_ids, self._stop_fn(stop), rule)
        self.decoder.check([req.prompt], draft, params, rule)
        return req

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

    def _stream(self, request: Request) -> Iterator[Piece]:
        """A generator over engine steps (no thread): each step's final tokens as a piece. Closing the
        generator early cancels the sequence."""
        engine = StepEngine(self.decoder, max_batch=1)
        if request.draft == AUTO:
            self.decoder.prepare_auto(1)
        seq = engine.add(request)
        try:
            while True:
                engine.step()
                ids = seq.take()
                if seq.finished:
                    yield Piece(ids, self.decode(ids) or "", seq.finish_reason, seq.stats.to_dict())
                    return
                if ids:
                    yield Piece(ids, self.decode(ids) or "")
        finally:
            engine.cancel(seq)  # a stream abandoned mid-way stops its sequence

    def close(self) -> None:
        self.decoder.close()  # saves the refined step costs for the next process
        self.engines.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(artifact: str | Path, backend: str = "ort", device: str = "cpu", threads: int = 0,
         prepack: bool | None = None, verify: bool | str = True) -> Model:  # fmt: skip
    """Open an exported artifact for generation (`prepack`: see engines.SharedWeights; `verify`:
    manifest.read_manifest: by default only files changed since last verified are hashed, "full": all)."""
    return Model(artifact, backend=backend, device=device, threads=threads, prepack=prepack, verify=verify)
