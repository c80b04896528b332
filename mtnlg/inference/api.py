"""The server's request shapes (pydantic, unknown fields refused) and their responses.

``POST /v1/completions`` follows OpenAI's legacy completions API; ``PUT /api`` follows
Megatron-LM's text generation server (``prompts``, ``tokens_to_generate``, ``random_seed``...;
``text`` is each prompt followed by its continuation). Both become a list of
:class:`~mtnlg.inference.params.Request` (:func:`to_requests`), checked by the engine's rules.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mtnlg.inference.params import Request, Result, SamplingParams

MAX_PROMPTS = 128
"""Sequences one HTTP request may ask for (prompts x n)."""
MAX_SEED = 2**62
"""Seeds (and seed + n) stay within what ``torch.Generator.manual_seed`` takes."""


class APIError(Exception):
    """A request refused with ``status`` and ``message`` (answered as OpenAI's error shape)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


NonEmpty = Annotated[str, Field(min_length=1)]


class CompletionRequest(_Strict):
    """OpenAI's ``/v1/completions`` body (``top_k`` is an extension; ``stream`` must be false)."""

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        texts = [v] if isinstance(v, str) else v
        if not texts or not all(texts):
            raise ValueError("prompt must be a non-empty string or a list of non-empty strings")
        return v

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v: bool) -> bool:
        if v:
            raise ValueError("stream=true is not supported by this server; send stream=false")
        return v


class MegatronRequest(_Strict):
    """Megatron-LM's ``PUT /api`` body (the fields this server supports)."""

    prompts: Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    tokens_to_generate: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    top_k: int = Field(0, ge=0, le=1000)
    top_p: float = Field(0.0, ge=0.0, le=1.0)
    """0 (Megatron's default) means no nucleus cut."""
    random_seed: int = Field(-1, ge=-1, le=MAX_SEED)
    """-1: a fresh random seed."""
    no_log: bool = False

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v):
        if not all(v):
            raise ValueError("every prompt must be a non-empty string")
        return v


def _seed(seed: int | None) -> int:
    return secrets.randbits(31) if seed is None or seed < 0 else seed


def _params(max_new, temperature, top_k, top_p, seed, stop=()) -> SamplingParams:
    try:
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=tuple(stop),
        )
    except ValueError as e:
        msg = re.sub(r"--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), str(e))
        raise APIError(400, msg) from None


def completion_requests(body: CompletionRequest, tokenize) -> tuple[list[str], list[Request]]:
    """(prompts, requests): each prompt ``n`` times in a row, choice j seeded ``seed + j``."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) * body.n > MAX_PROMPTS:
        raise APIError(400, f"len(prompt) x n = {len(prompts) * body.n} exceeds {MAX_PROMPTS}")
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    seed = _seed(body.seed)
    reqs = []
    for text in prompts:
        toks = tuple(tokenize(text))
        for j in range(body.n):
            p = _params(body.max_tokens, body.temperature, body.top_k, body.top_p, seed + j, stop)
            reqs.append(Request(toks, p))
    return prompts, reqs


def megatron_requests(body: MegatronRequest, tokenize) -> list[Request]:
    top_p = body.top_p if body.top_p > 0 else 1.0
    p = _params(
        body.tokens_to_generate, body.temperature, body.top_k, top_p, _seed(body.random_seed)
    )
    return [Request(tuple(tokenize(t)), p) for t in body.prompts]


FINISH = {"eod": "stop", "stop": "stop", "length": "length"}


def completion_response(model: str, reqs: list[Request], results: list[Result]) -> dict:
    choices = [
        {"text": r.text, "index": i, "logprobs": None, "finish_reason": FINISH[r.finish_reason]}
        for i, r in enumerate(results)
    ]
    n_prompt = sum(len(q.prompt_tokens) for q in reqs)
    n_out = sum(len(r.tokens) for r in results)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out,
        },
    }


def megatron_response(prompts: list[str], results: list[Result], detok) -> dict:
    """Megatron's answer: prompt + continuation, and each generated token's text."""
    return {
        "text": [p + r.text for p, r in zip(prompts, results)],
        "segments": [[detok([t]) for t in r.tokens] for r in results],
        "tokens": [r.tokens for r in results],
        "finish_reason": [r.finish_reason for r in results],
    }


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
