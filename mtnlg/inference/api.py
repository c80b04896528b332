"""The server's request shapes (pydantic, strict JSON types, unknown fields refused) and answers.

``POST /v1/completions`` follows OpenAI's legacy completions API; ``PUT /api`` follows
Megatron-LM's text generation server (``prompts``, ``tokens_to_generate``, ``random_seed``...;
``text`` is each prompt followed by its continuation). Both become a list of
:class:`~mtnlg.inference.params.Request`. Validation rules (docs/inference.md lists them):

- JSON types are strict: ``"0.5"`` or ``true`` where a number goes, ``1.0`` where an integer
  goes are refused; numbers must be finite and in range; ``null`` means the default for the
  fields OpenAI marks nullable.
- Unknown fields are refused (400), as OpenAI does. OpenAI fields this server does not implement
  (``echo``, ``logprobs``, penalties...) are accepted only at their neutral value.
- Prompts and stop strings must be valid Unicode (no unpaired surrogate).
"""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mtnlg.inference.errors import APIError, error_body, internal_error  # noqa: F401 - api.*
from mtnlg.inference.params import Request, Result, SamplingParams

MAX_PROMPTS = 128
"""Sequences one HTTP request may ask for (prompts x n)."""
MAX_SEED = 2**62
"""Seeds (and seed + n) stay within what ``torch.Generator.manual_seed`` takes."""
MAX_TOP_K = 2**31 - 1


def _unicode(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        msg = f"{what}is not valid Unicode (an unpaired surrogate at {e.start})"
        raise ValueError(msg) from None
    return text


def _texts(v: Any, max_items: int, allow_str: bool) -> Any:
    """``v`` is a non-empty string or a list of 1..max_items of them (else ValueError; the
    message follows the field's name)."""
    if allow_str and isinstance(v, str):
        items = [v]
    elif isinstance(v, list) and v and len(v) <= max_items and all(isinstance(x, str) for x in v):
        items = v
    else:
        one = "a non-empty string or " if allow_str else ""
        raise ValueError(f"must be {one}a list of 1 to {max_items} non-empty strings")
    for i, x in enumerate(items):
        where = "" if isinstance(v, str) else f"item {i} "
        if not x:
            raise ValueError(f"{where}is empty; it must be a non-empty string")
        _unicode(x, where)
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*")
    @classmethod
    def _null_is_default(cls, v, info):
        """``null`` in a nullable field means its default."""
        return cls.model_fields[info.field_name].default if v is None else v


def _num(**kw):
    return Field(allow_inf_nan=False, **kw)


UNSUPPORTED = {
    # OpenAI completions fields accepted only at the value that changes nothing (or null)
    "echo": (lambda v: v is False, "false"),
    "logprobs": (lambda v: False, "null"),
    "suffix": (lambda v: v == "", 'null or ""'),
    "frequency_penalty": (lambda v: v == 0, "0"),
    "presence_penalty": (lambda v: v == 0, "0"),
    "logit_bias": (lambda v: v == {}, "null or {}"),
    "stream_options": (lambda v: False, "null"),
}


class CompletionRequest(_Strict):
    """OpenAI's ``/v1/completions`` body (``top_k`` is an extension; ``stream`` must be false)."""

    model: str | None = None
    prompt: str | list[str]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    temperature: Annotated[float, _num(ge=0.0, le=2.0)] | None = 1.0
    top_p: Annotated[float, _num(gt=0.0, le=1.0)] | None = 1.0
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K)] | None = 0
    n: Annotated[int, Field(ge=1, le=MAX_PROMPTS)] | None = 1
    best_of: Annotated[int, Field(ge=1, le=MAX_PROMPTS)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stream: bool | None = False
    user: str | None = None
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    frequency_penalty: Annotated[float, _num()] | None = 0.0
    presence_penalty: Annotated[float, _num()] | None = 0.0
    logit_bias: dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        return _texts(v, MAX_PROMPTS, allow_str=True)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        return v if v is None else _texts(v, 4, allow_str=True)

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v: bool) -> bool:
        if v:
            raise ValueError("stream=true is not supported by this server; send stream=false")
        return v

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _neutral(cls, v, info):
        neutral, value = UNSUPPORTED[info.field_name]
        if v is not None and not neutral(v):  # null is the default, neutral
            raise ValueError(f"not supported by this server (only {value})")
        return v

    @model_validator(mode="after")
    def _whole(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: not supported by this server (only null or equal to n)")
        if len(self.prompts) * self.n > MAX_PROMPTS:
            raise ValueError(
                f"len(prompt) x n = {len(self.prompts) * self.n} exceeds {MAX_PROMPTS}"
            )
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class MegatronRequest(_Strict):
    """Megatron-LM's ``PUT /api`` body (the fields this server supports)."""

    prompts: list[str]
    tokens_to_generate: Annotated[int, Field(ge=1)] = 64
    temperature: Annotated[float, _num(gt=0.0, le=100.0)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=1000)] = 0
    top_p: Annotated[float, _num(ge=0.0, le=1.0)] = 0.0
    """0 (Megatron's default) means no nucleus cut."""
    random_seed: Annotated[int, Field(ge=-1, le=MAX_SEED)] = -1
    """-1: a fresh random seed."""
    no_log: bool = False

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts(cls, v):
        return _texts(v, MAX_PROMPTS, allow_str=False)


def prompt_bytes(prompts: list[str]) -> int:
    """UTF-8 bytes of a request's prompt text, all prompts together."""
    return sum(len(p.encode("utf-8")) for p in prompts)


def check_prompt_bytes(prompts: list[str], limit: int, field: str) -> None:
    """400 if the prompts' UTF-8 size exceeds ``limit`` (checked before tokenizing)."""
    size = prompt_bytes(prompts)
    if size > limit:
        raise APIError(
            400,
            f"{field} is {size} bytes (UTF-8, all prompts together); this server accepts at "
            f"most {limit} bytes of prompt text per request (--max-prompt-bytes)",
            field,
            "prompt_too_large",
        )


def _seed(seed: int | None) -> int:
    return secrets.randbits(31) if seed is None or seed < 0 else seed


def _tokens(prompts: list[str], tokenize, new: int, limit: int, field: str) -> list[tuple]:
    """Each prompt's token ids; 400 if prompt + ``new`` tokens exceed the context ``limit``."""
    out = []
    for i, text in enumerate(prompts):
        toks = tuple(tokenize(text))
        if len(toks) + new > limit:
            raise APIError(
                400,
                f"prompt {i} is {len(toks)} tokens; with {field} = {new} that is "
                f"{len(toks) + new}, over the model's context of {limit} tokens "
                f"(max_position_embeddings ({limit}))",
                field,
                "context_length_exceeded",
            )
        out.append(toks)
    return out


def completion_requests(body: CompletionRequest, tokenize, limit: int) -> list[Request]:
    """Each prompt ``n`` times in a row, choice j seeded ``seed + j``."""
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    seed = _seed(body.seed)
    reqs = []
    for toks in _tokens(body.prompts, tokenize, body.max_tokens, limit, "max_tokens"):
        for j in range(body.n):
            p = SamplingParams(
                max_new_tokens=body.max_tokens,
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                seed=seed + j,
                stop=tuple(stop),
            )
            reqs.append(Request(toks, p))
    return reqs


def megatron_requests(body: MegatronRequest, tokenize, limit: int) -> list[Request]:
    new = body.tokens_to_generate
    p = SamplingParams(
        max_new_tokens=new,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p if body.top_p > 0 else 1.0,
        seed=_seed(body.random_seed),
    )
    return [
        Request(t, p) for t in _tokens(body.prompts, tokenize, new, limit, "tokens_to_generate")
    ]


FINISH = {"eod": "stop", "stop": "stop", "length": "length"}


def usage(reqs: list[Request], results: list[Result], n: int) -> dict:
    """OpenAI's count: each prompt's tokens once (not once per choice: ``reqs`` holds each
    prompt ``n`` times in a row), and the generated tokens of every choice."""
    n_prompt = sum(len(q.prompt_tokens) for q in reqs[::n])
    n_out = sum(len(r.tokens) for r in results)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def completion_response(model: str, reqs: list[Request], results: list[Result], n: int) -> dict:
    choices = [
        {"text": r.text, "index": i, "logprobs": None, "finish_reason": FINISH[r.finish_reason]}
        for i, r in enumerate(results)
    ]
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(reqs, results, n),
    }


def megatron_response(prompts: list[str], results: list[Result], detok) -> dict:
    """Megatron's answer: prompt + continuation, and each generated token's text."""
    return {
        "text": [p + r.text for p, r in zip(prompts, results)],
        "segments": [[detok([t]) for t in r.tokens] for r in results],
        "tokens": [r.tokens for r in results],
        "finish_reason": [r.finish_reason for r in results],
    }
