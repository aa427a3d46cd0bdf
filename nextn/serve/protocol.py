"""The OpenAI completions API as nextn serves it: the request body, its checks, the response bodies.

Fields follow OpenAI's `POST /v1/completions`; `top_k` is vLLM's extension (0 or -1: off) and `draft`
nextn's ("auto" or an integer K). A bad request is an `APIError`: an HTTP 4xx with OpenAI's error body,
naming the field (`param`).
"""

from __future__ import annotations

import time
import uuid
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr


class APIError(Exception):
    """An HTTP error with OpenAI's JSON body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions. Types are strict: "5" is not an integer."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    prompt: StrictStr | list[StrictInt] | list[StrictStr]
    max_tokens: StrictInt = 16
    temperature: StrictFloat | StrictInt = 1.0
    top_p: StrictFloat | StrictInt = 1.0
    top_k: StrictInt = 0
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    draft: StrictStr | StrictInt | None = None  # nextn: "auto" or K; None: the server's --draft
    ignore_eos: StrictBool = False  # vLLM's: generate max_tokens whatever the model says (benchmarks)
    echo: StrictBool = False
    logprobs: StrictInt | None = None

    def check(self, served: str) -> None:
        """Ranges and what nextn does not serve, each naming its field."""
        if self.model is not None and self.model != served:
            raise APIError(404, f"model '{self.model}' does not exist; this server serves '{served}'", "model",
                           code="model_not_found")  # fmt: skip
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError(400, "prompt: empty prompt", "prompt")
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise APIError(400, "prompt: one prompt per request (a string or a list of token ids)", "prompt")
        if self.max_tokens < 1:
            raise APIError(400, f"max_tokens {self.max_tokens}: must be >= 1", "max_tokens")
        if not 0 <= self.temperature <= 100:
            raise APIError(400, f"temperature {self.temperature}: must be in [0, 100]", "temperature")
        if not 0 < self.top_p <= 1:
            raise APIError(400, f"top_p {self.top_p}: must be in (0, 1]", "top_p")
        if self.top_k < -1:
            raise APIError(400, f"top_k {self.top_k}: must be -1 or 0 (off) or a positive integer", "top_k")
        if self.n != 1:
            raise APIError(400, f"n {self.n}: this server returns one choice per request", "n")
        if self.echo:
            raise APIError(400, "echo is not supported", "echo")
        if self.logprobs is not None:
            raise APIError(400, "logprobs is not supported", "logprobs")
        if isinstance(self.draft, str) and self.draft != "auto":
            raise APIError(400, f"draft {self.draft!r}: expected \"auto\" or an integer >= 0", "draft")
        if isinstance(self.draft, int) and self.draft < 0:
            raise APIError(400, f"draft {self.draft}: must be >= 0", "draft")

    @property
    def prompt_one(self) -> str | list[int]:
        p = self.prompt
        return p[0] if isinstance(p, list) and p and isinstance(p[0], str) else p

    @property
    def stops(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop) or None


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def completion_body(cid: str, model: str, text: str, token_ids: list[int], finish_reason: str | None,
                    prompt_tokens: int, stats: dict | None = None) -> dict:  # fmt: skip
    """A whole completion. `token_ids` and `nextn` (the request's decoding stats) are nextn's extensions."""
    return {**chunk_body(cid, model, text, token_ids, finish_reason), "usage": usage(prompt_tokens, len(token_ids)),
            **({"nextn": stats} if stats is not None else {})}  # fmt: skip


def chunk_body(cid: str, model: str, text: str, token_ids: list[int], finish_reason: str | None) -> dict:
    """One server-sent event of a streamed completion."""
    return {**_envelope(cid, model), "choices": [{"index": 0, "text": text, "logprobs": None,
                                                  "finish_reason": finish_reason, "token_ids": token_ids}]}  # fmt: skip


def usage_chunk_body(cid: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """stream_options.include_usage: the last event before [DONE], with no choices."""
    return {**_envelope(cid, model), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def _envelope(cid: str, model: str) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def validation_error(errors: list[dict]) -> APIError:
    """pydantic's first complaint as one line naming the field (e.g. `max_tokens: expected an integer`)."""
    if not errors:
        return APIError(400, "the request body is not a JSON object")
    e = errors[0]
    if e.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})")
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # a union's complaint carries the tried type in its path (prompt.str, prompt.list[int].0): keep the field
    field = loc[0] if loc else None
    if e.get("type") == "missing":
        return APIError(400, f"{field}: this field is required", field)
    if field is None:
        return APIError(400, f"the request body must be a JSON object ({e.get('msg', '')})")
    return APIError(400, f"{field}: {e.get('msg', 'invalid value')} (got {_short(e.get('input'))})", field)


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."

