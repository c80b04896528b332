"""``POST /v1/chat/completions``: the request, the model's chat template, and the answer.

The conversation is rendered and tokenized exactly as ``transformers`` does it:
``AutoTokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`` on a
``transformers`` tokenizer built from the engine's own tokenizer files, with the template they
carry (``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``) or the one of
``--chat-template FILE``. A model without a template still serves completions; its chat requests
get a 400 that says how to give it one.

Messages are ``{"role": "system" | "developer" | "user" | "assistant" | "tool", "content": str
or [{"type": "text", "text": str}, ...] (joined), "name"?: str}`` (a ``tool`` message may carry
``tool_call_id``). OpenAI fields this server does not implement (tools, penalties,
``response_format``...) are accepted only at their neutral value, as in :mod:`.api`.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator

from mtnlg.inference.api import (
    FINISH,
    MAX_LOGPROBS,
    APIError,
    Sampling,
    chat_logprobs,
    check_unicode,
    context_error,
    finite_number,
    neutral_only,
    new_id,
    new_seed,
    usage,
)
from mtnlg.inference.params import Request, Result

ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "name", "tool_call_id")
MISSING_HINT = "start the server with --chat-template FILE"


# ---- the template


def _compile(text: str) -> None:
    """Parse ``text`` as ``transformers`` does (its sandboxed Jinja environment and tags)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    _compile_jinja_template(text)


def read_template_file(path: str | Path) -> str:
    """The Jinja template in ``path``; ValueError naming ``--chat-template`` when it is missing,
    unreadable, empty or not a valid template."""
    import jinja2

    where = f"--chat-template {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: cannot read the file ({e})") from None
    if not text.strip():
        raise ValueError(f"{where}: the file is empty; it must hold a Jinja chat template")
    try:
        _compile(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{where}: not a valid Jinja template (line {e.lineno}: {e})") from None
    return text


def no_chat_template(problem: str | None = None) -> APIError:
    """The 400 of a chat request to a model without a (usable) chat template."""
    why = problem or "this model has no chat template"
    code = "chat_template_invalid" if problem else "chat_template_missing"
    return APIError(400, f"{why}; {MISSING_HINT}", "messages", code)


def hf_tokenizer(tokenizer):
    """A ``transformers`` tokenizer built from ``tokenizer``'s saved files (and sidecars)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        return AutoTokenizer.from_pretrained(d)


class ChatTemplate:
    """Renders a conversation to prompt ids (one caller at a time: the server's worker).

    ``override``: a ``--chat-template`` file, used instead of the tokenizer's own template;
    ValueError (naming the flag) when it cannot be used. Without either, :meth:`render` raises
    the 400 ``chat_template_missing``.
    """

    def __init__(self, tokenizer, override: str | Path | None = None):
        import jinja2

        self.source = f"--chat-template {override}" if override is not None else "the model's own"
        self.template = read_template_file(override) if override is not None else None
        own = getattr(tokenizer, "chat_template", None)
        self.problem = None  # why the model's own template cannot be used (None: it can)
        if self.template is None and isinstance(own, str):
            try:
                _compile(own)
            except jinja2.TemplateSyntaxError as e:
                self.problem = f"this model's chat template is not valid Jinja ({e})"
        self.available = self.template is not None or bool(own)
        self._hf = None
        if self.available:
            try:
                self._hf = hf_tokenizer(tokenizer)
            except Exception as e:  # noqa: BLE001 - named below, at startup
                raise ValueError(
                    f"chat template ({self.source}): cannot build a transformers tokenizer from "
                    f"the model's tokenizer files ({type(e).__name__}: {e})"
                ) from None
        self._lock = threading.Lock()

    def render(self, messages: list[dict]) -> list[int]:
        """``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``'s ids;
        400 when there is no template or the template refuses the messages."""
        import jinja2

        if not self.available or self.problem:
            raise no_chat_template(self.problem)
        try:
            with self._lock:
                ids = self._hf.apply_chat_template(
                    messages,
                    chat_template=self.template,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            msg = f"the chat template ({self.source}) refused these messages: {e}"
            raise APIError(400, msg, "messages", "chat_template_error") from None
        ids = [int(t) for t in ids]
        if not ids:
            raise APIError(
                400, "the chat template rendered these messages as no tokens", "messages"
            )
        return ids


# ---- the request


def _content(where: str, v: Any) -> str:
    if isinstance(v, str):
        return check_unicode(v, f"{where}.content ")
    if not isinstance(v, list) or not v:
        raise ValueError(f"{where}.content must be a string or a non-empty list of text parts")
    texts = []
    for j, part in enumerate(v):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"{at}: only {{'type': 'text', 'text': str}} parts, got {kind!r}")
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise ValueError(f"{at} must be exactly {{'type': 'text', 'text': str}}")
        texts.append(check_unicode(part["text"], f"{at}.text "))
    return "".join(texts)


def _message(i: int, m: Any) -> dict:
    """One message, checked, with its content joined into one string."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ValueError(f"{where} must be an object with role and content")
    extra = sorted(set(m) - set(MESSAGE_KEYS))
    if extra:
        raise ValueError(f"{where}.{extra[0]}: not supported by this server (only {MESSAGE_KEYS})")
    role = m.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role must be one of {ROLES}, got {role!r}")
    out = {"role": role, "content": _content(where, m.get("content"))}
    for key in ("name", "tool_call_id"):
        v = m.get(key)
        if v is None:
            continue
        if key == "tool_call_id" and role != "tool":
            raise ValueError(f"{where}.tool_call_id: only in a tool message")
        if not isinstance(v, str):
            raise ValueError(f"{where}.{key} must be a string")
        out[key] = check_unicode(v, f"{where}.{key} ")
    return out


CHAT_UNSUPPORTED = {
    # OpenAI chat fields accepted only at the value that changes nothing (or null)
    "frequency_penalty": (lambda v: v == 0, "0"),
    "presence_penalty": (lambda v: v == 0, "0"),
    "logit_bias": (lambda v: v == {}, "null or {}"),
    "tools": (lambda v: v == [], "null or []"),
    "tool_choice": (lambda v: v == "none", 'null or "none"'),
    "response_format": (lambda v: v == {"type": "text"}, 'null or {"type": "text"}'),
    "service_tier": (lambda v: v in ("auto", "default"), 'null, "auto" or "default"'),
    "store": (lambda v: v is False, "null or false"),
    "metadata": (lambda v: v == {}, "null or {}"),
    "modalities": (lambda v: v == ["text"], 'null or ["text"]'),
    "reasoning_effort": (lambda v: False, "null"),
}


class ChatCompletionRequest(Sampling):
    """OpenAI's ``/v1/chat/completions`` body (``top_k`` is an extension)."""

    model: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    """Either; neither: up to the end of the model's context."""
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    frequency_penalty: Annotated[float, finite_number()] | None = 0.0
    presence_penalty: Annotated[float, finite_number()] | None = 0.0
    logit_bias: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v):
        if not isinstance(v, list) or not v:
            raise ValueError("must be a non-empty list of messages")
        return [_message(i, m) for i, m in enumerate(v)]

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_max(cls, v, info):
        other = info.data.get("max_tokens")
        if v is not None and other is not None and other != v:
            raise ValueError(f"is {v} but max_tokens is {other}: send one of them")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v, info):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs to be true")
        return v

    @field_validator(*CHAT_UNSUPPORTED)
    @classmethod
    def _neutral(cls, v, info):
        return neutral_only(CHAT_UNSUPPORTED, info.field_name, v)

    @property
    def texts(self) -> list[str]:
        """The messages' text (for the prompt size check)."""
        return [m["content"] for m in self.messages]

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def chat_requests(body: ChatCompletionRequest, template: ChatTemplate, limit: int) -> list[Request]:
    """The rendered conversation ``n`` times, choice j seeded ``seed + j``; without a token
    limit a choice may run to the end of the context."""
    ids = tuple(template.render(body.messages))
    new = body.max_new
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    what = "messages (chat template applied)"
    if new is None:
        new = limit - len(ids)
        if new < 1:
            msg = (
                f"{what} are {len(ids)} tokens: the model's context of {limit} tokens "
                "(max_position_embeddings) leaves no room to generate"
            )
            raise APIError(400, msg, "messages", "context_length_exceeded")
    elif len(ids) + new > limit:
        raise context_error(what, len(ids), field, new, limit)
    seed = new_seed(body.seed)
    k = (body.top_logprobs or 0) if body.logprobs else None
    return [Request(ids, body.sampling(new, seed + j, logprobs=k)) for j in range(body.n)]


# ---- the answer


def chat_choice(index: int, req: Request, res: Result, tokenizer=None) -> dict:
    logprobs = None
    if req.params.logprobs is not None:
        logprobs = chat_logprobs(tokenizer, res.logprobs or [])
    return {
        "index": index,
        "message": {"role": "assistant", "content": res.text},
        "logprobs": logprobs,
        "finish_reason": FINISH[res.finish_reason],
    }


def chat_response(
    model: str, reqs: list[Request], results: list[Result], n: int, tokenizer=None
) -> dict:
    """OpenAI's ``chat.completion``; ``tokenizer`` is needed when ``logprobs`` were asked for."""
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [chat_choice(i, q, r, tokenizer) for i, (q, r) in enumerate(zip(reqs, results))],
        "usage": usage(reqs, results, n),
    }
