"""The server's request shapes (pydantic, strict JSON types, unknown fields refused) and answers.

``POST /v1/completions`` follows OpenAI's legacy completions API; ``PUT /api`` follows
Megatron-LM's text generation server (``prompts``, ``tokens_to_generate``, ``random_seed``...;
``text`` is each prompt followed by its continuation); ``POST /v1/chat/completions`` is in
:mod:`mtnlg.inference.chat`. Each becomes a list of :class:`~mtnlg.inference.params.Request`.
Validation rules (docs/inference.md lists them):

- JSON types are strict: ``"0.5"`` or ``true`` where a number goes, ``1.0`` where an integer
  goes are refused; numbers must be finite and in range; ``null`` means the default for the
  fields OpenAI marks nullable.
- Unknown fields are refused (400), as OpenAI does. OpenAI fields this server does not implement
  (``suffix``, penalties...) are accepted only at their neutral value.
- Prompts and stop strings must be valid Unicode (no unpaired surrogate).
- ``stream_options`` only with ``stream: true`` (as OpenAI); ``logprobs`` up to 5.
"""

from __future__ import annotations

import codecs
import math
import secrets
import time
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mtnlg.inference.errors import APIError, error_body, internal_error  # noqa: F401 - api.*
from mtnlg.inference.params import MAX_LOGPROBS, Request, Result, SamplingParams, TokenLogprob

MAX_PROMPTS = 128
"""Sequences one HTTP request may ask for (prompts x n)."""
MAX_SEED = 2**62
"""Seeds (and seed + n) stay within what ``torch.Generator.manual_seed`` takes."""
MAX_TOP_K = 2**31 - 1
MAX_STOP = 4
"""Stop strings per request (OpenAI's limit)."""
STREAM_OPTIONS = ("include_usage", "include_obfuscation")


def check_unicode(text: str, what: str) -> str:
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
        check_unicode(x, where)
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*")
    @classmethod
    def _null_is_default(cls, v, info):
        """``null`` in a nullable field means its default."""
        return cls.model_fields[info.field_name].default if v is None else v


def finite_number(**kw):
    return Field(allow_inf_nan=False, **kw)


def neutral_only(table: dict, name: str, v: Any) -> Any:
    """``v`` unless it is neither null nor the neutral value ``table[name]`` allows."""
    neutral, value = table[name]
    if v is not None and not neutral(v):  # null is the default, neutral
        raise ValueError(f"not supported by this server (only {value})")
    return v


class Sampling(_Strict):
    """Fields both OpenAI endpoints share (``top_k`` is an extension)."""

    temperature: Annotated[float, finite_number(ge=0.0, le=2.0)] | None = 1.0
    top_p: Annotated[float, finite_number(gt=0.0, le=1.0)] | None = 1.0
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K)] | None = 0
    n: Annotated[int, Field(ge=1, le=MAX_PROMPTS)] | None = 1
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    """``{"include_usage": bool}`` (``include_obfuscation`` only false: chunks never carry
    an ``obfuscation`` field); only with ``stream: true``."""
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        return v if v is None else _texts(v, MAX_STOP, allow_str=True)

    @field_validator("stream_options", mode="before")
    @classmethod
    def _stream_options(cls, v):
        if v is None:
            return v
        if not isinstance(v, dict):
            raise ValueError('must be an object such as {"include_usage": true}')
        for key, x in v.items():
            if key not in STREAM_OPTIONS:
                raise ValueError(f"{key}: not supported by this server (only {STREAM_OPTIONS})")
            if x is not None and not isinstance(x, bool):
                raise ValueError(f"{key} must be a boolean")
        if v.get("include_obfuscation"):
            raise ValueError("include_obfuscation: not supported by this server (only false)")
        return v

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, v, info):
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        """A stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream and (self.stream_options or {}).get("include_usage"))

    def sampling(self, max_new: int, seed: int, **logprobs) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=seed,
            stop=self.stops,
            **logprobs,
        )


UNSUPPORTED = {
    # OpenAI completions fields accepted only at the value that changes nothing (or null)
    "suffix": (lambda v: v == "", 'null or ""'),
    "frequency_penalty": (lambda v: v == 0, "0"),
    "presence_penalty": (lambda v: v == 0, "0"),
    "logit_bias": (lambda v: v == {}, "null or {}"),
}


class CompletionRequest(Sampling):
    """OpenAI's ``/v1/completions`` body."""

    model: str | None = None
    prompt: str | list[str]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    best_of: Annotated[int, Field(ge=1, le=MAX_PROMPTS)] | None = None
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: str | None = None
    frequency_penalty: Annotated[float, finite_number()] | None = 0.0
    presence_penalty: Annotated[float, finite_number()] | None = 0.0
    logit_bias: dict[str, Any] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        return _texts(v, MAX_PROMPTS, allow_str=True)

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _neutral(cls, v, info):
        return neutral_only(UNSUPPORTED, info.field_name, v)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("not supported by this server (only null or equal to n)")
        return v

    @model_validator(mode="after")
    def _whole(self):
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
    temperature: Annotated[float, finite_number(gt=0.0, le=100.0)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=1000)] = 0
    top_p: Annotated[float, finite_number(ge=0.0, le=1.0)] = 0.0
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


def new_seed(seed: int | None) -> int:
    """``seed``, or a fresh random one when it is None or negative."""
    return secrets.randbits(31) if seed is None or seed < 0 else seed


def context_error(what: str, n_prompt: int, field: str, new: int, limit: int) -> APIError:
    return APIError(
        400,
        f"{what} is {n_prompt} tokens; with {field} = {new} that is {n_prompt + new}, over the "
        f"context of {limit} tokens (the model's max_position_embeddings, or the server's "
        "--max-model-len when smaller)",
        field,
        "context_length_exceeded",
    )


def _tokens(prompts: list[str], tokenize, new: int, limit: int, field: str) -> list[tuple]:
    """Each prompt's token ids; 400 if prompt + ``new`` tokens exceed the context ``limit``."""
    out = []
    for i, text in enumerate(prompts):
        toks = tuple(tokenize(text))
        if len(toks) + new > limit:
            raise context_error(f"prompt {i}", len(toks), field, new, limit)
        out.append(toks)
    return out


def completion_requests(body: CompletionRequest, tokenize, limit: int) -> list[Request]:
    """Each prompt ``n`` times in a row, choice j seeded ``seed + j``; ``logprobs`` k asks for
    k alternatives per generated token, and with ``echo`` per prompt token too."""
    seed = new_seed(body.seed)
    k = body.logprobs
    extra = {"logprobs": k, "prompt_logprobs": k if body.echo else None}
    reqs = []
    for toks in _tokens(body.prompts, tokenize, body.max_tokens, limit, "max_tokens"):
        for j in range(body.n):
            reqs.append(Request(toks, body.sampling(body.max_tokens, seed + j, **extra)))
    return reqs


def megatron_requests(body: MegatronRequest, tokenize, limit: int) -> list[Request]:
    new = body.tokens_to_generate
    p = SamplingParams(
        max_new_tokens=new,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p if body.top_p > 0 else 1.0,
        seed=new_seed(body.random_seed),
    )
    return [
        Request(t, p) for t in _tokens(body.prompts, tokenize, new, limit, "tokens_to_generate")
    ]


# ---- answers

FINISH = {"eod": "stop", "stop": "stop", "length": "length"}


def new_id(prefix: str) -> str:
    """A response id (``cmpl`` / ``chatcmpl``); a stream uses one id for all its chunks."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(reqs: list[Request], results: list[Result], n: int) -> dict:
    """OpenAI's count: each prompt's tokens once (not once per choice: ``reqs`` holds each
    prompt ``n`` times in a row), and the generated tokens of every choice."""
    n_prompt = sum(len(q.prompt_tokens) for q in reqs[::n])
    n_out = sum(len(r.tokens) for r in results)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def _gpt2_byte_table() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in character -> the byte it stands for (the
    inverse of GPT-2's ``bytes_to_unicode``)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


BYTE_OF = _gpt2_byte_table()


def is_byte_level(tokenizer) -> bool:
    """Whether ``tokenizer`` (an mtnlg one backed by ``tokenizers``) is byte-level BPE (GPT-2,
    Llama 3...): its text is the UTF-8 decoding of its tokens' bytes put together."""
    rust = getattr(tokenizer, "_tok", None)
    return rust is not None and type(rust.decoder).__name__ == "ByteLevel"


def token_bytes(tokenizer, token: int) -> bytes:
    """The raw bytes of one token: exact for byte-level BPE (a token may be part of a UTF-8
    character), else the UTF-8 of its text."""
    if is_byte_level(tokenizer):
        piece = tokenizer._tok.id_to_token(int(token))
        if piece is not None and all(c in BYTE_OF for c in piece):
            return bytes(BYTE_OF[c] for c in piece)
    return tokenizer.detokenize([int(token)]).encode("utf-8")


def token_text(tokenizer, token: int) -> str:
    """One token's text, as the tokenizer decodes it alone (U+FFFD for a partial character)."""
    return tokenizer.detokenize([int(token)])


def text_offsets(tokenizer, tokens: list[int], start: int = 0) -> list[int]:
    """Where each token's text starts in the decoded text (characters, from ``start``); a token
    that completes a character split over several tokens starts after the previous character."""
    decode = codecs.getincrementaldecoder("utf-8")("replace")
    out, at = [], start
    for t in tokens:
        out.append(at)
        at += len(decode.decode(token_bytes(tokenizer, t)))
    return out


UNLIKELY = -9999.0
"""What OpenAI sends for a log-probability too small to represent (JSON has no -inf)."""


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else UNLIKELY


def completion_logprobs(
    tokenizer, tokens: list[int], entries: list[TokenLogprob | None], start: int = 0
) -> dict:
    """The legacy completions ``logprobs`` object of ``tokens``: ``tokens`` (each one's text),
    ``token_logprobs``, ``top_logprobs`` (token text -> logprob, most likely first) and
    ``text_offset`` (from ``start``); an entry None (the prompt's first token: nothing before
    it to predict it from) gives null in the two middle lists."""
    return {
        "tokens": [token_text(tokenizer, t) for t in tokens],
        "token_logprobs": [finite(e.logprob) if e is not None else None for e in entries],
        "top_logprobs": [
            {token_text(tokenizer, t): finite(lp) for t, lp in e.top} if e is not None else None
            for e in entries
        ],
        "text_offset": text_offsets(tokenizer, tokens, start),
    }


def _alt(tokenizer, token: int, logprob: float) -> dict:
    text = token_text(tokenizer, token)
    return {"token": text, "logprob": finite(logprob), "bytes": list(token_bytes(tokenizer, token))}


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """Chat's ``logprobs`` object: ``{"content": [{"token", "logprob", "bytes",
    "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}``."""
    content = [
        {
            **_alt(tokenizer, e.token, e.logprob),
            "top_logprobs": [_alt(tokenizer, *t) for t in e.top],
        }
        for e in entries
    ]
    return {"content": content}


def stream_logprobs(ev, tokenizer, prompt_tokens=None, start: int = 0) -> dict:
    """The legacy ``logprobs`` of one stream event (``ev.logprob``: its token's entry, or None
    when it has no token); with ``prompt_tokens`` (``echo``), an event carrying
    ``prompt_logprobs`` has the prompt's entries first. ``start``: the choice's text sent
    before this chunk (``text_offset`` counts from it)."""
    toks, entries = [], []
    if prompt_tokens is not None and ev.prompt_logprobs is not None:
        toks, entries = list(prompt_tokens), list(ev.prompt_logprobs)
    if ev.logprob is not None:
        toks, entries = [*toks, ev.logprob.token], [*entries, ev.logprob]
    return completion_logprobs(tokenizer, toks, entries, start)


def chat_stream_logprobs(ev, tokenizer) -> dict:
    """Chat's ``logprobs`` of one stream event (``{"content": []}`` when it has no token)."""
    return chat_logprobs(tokenizer, [ev.logprob] if ev.logprob is not None else [])


def completion_choice(
    index: int, req: Request, res: Result, echo: str | None = None, tokenizer=None
) -> dict:
    """One non-stream choice; ``echo``: the prompt text, put before the generated text (and,
    with ``logprobs``, the prompt tokens' entries before the generated ones')."""
    text = res.text if echo is None else echo + res.text
    logprobs = None
    if req.params.logprobs is not None:
        toks, entries = list(res.tokens), list(res.logprobs or [None] * len(res.tokens))
        if echo is not None:
            prompt = res.prompt_logprobs or [None] * len(req.prompt_tokens)
            toks, entries = [*req.prompt_tokens, *toks], [*prompt, *entries]
        logprobs = completion_logprobs(tokenizer, toks, entries)
    return {
        "text": text,
        "index": index,
        "logprobs": logprobs,
        "finish_reason": FINISH[res.finish_reason],
    }


def completion_response(
    model: str,
    reqs: list[Request],
    results: list[Result],
    n: int,
    echo_prompts: list[str] | None = None,
    tokenizer=None,
) -> dict:
    """OpenAI's ``text_completion``; with ``echo``, ``echo_prompts`` (one per choice, or one
    per prompt) are put before each choice's text; ``tokenizer`` is needed when ``logprobs``
    were asked for."""
    per = 1 if echo_prompts is None or len(echo_prompts) == len(results) else n
    choices = [
        completion_choice(
            i, q, r, None if echo_prompts is None else echo_prompts[i // per], tokenizer
        )
        for i, (q, r) in enumerate(zip(reqs, results))
    ]
    return {
        "id": new_id("cmpl"),
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


CHAT_NAMES = ("ChatCompletionRequest", "ChatTemplate", "chat_requests", "chat_response")
CHAT_NAMES += ("no_chat_template",)


def __getattr__(name: str):
    """``api.ChatCompletionRequest`` and the other :data:`CHAT_NAMES` are
    :mod:`mtnlg.inference.chat`'s (imported on first use: chat builds on this module)."""
    if name in CHAT_NAMES:
        from mtnlg.inference import chat

        return getattr(chat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
