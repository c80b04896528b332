"""Streaming answers: the text that is safe to send so far, and the Server-Sent Events chunks.

A stream is ``data: {json}\\n\\n`` events, every chunk with the response's ``id`` and
``created``: ``text_completion`` chunks (``/v1/completions``) or ``chat.completion.chunk`` ones
with a ``delta`` (``/v1/chat/completions``: a choice's first chunk carries
:data:`ROLE_DELTA`), then, with ``stream_options.include_usage``, one chunk with no choices and
the usage, then :data:`DONE`. An error after the stream started is sent as an event
``{"error": {...}}`` (:func:`error_event`), the envelope of :func:`~.errors.error_body`.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from mtnlg.inference.errors import APIError, error_body

REPLACEMENT = "\ufffd"
"""What a decoder gives for the bytes of a character not complete yet."""
DONE = b"data: [DONE]\n\n"
ROLE_DELTA = {"role": "assistant", "content": ""}
"""The ``delta`` of a chat choice's first chunk."""


def safe_text(text: str, stop: tuple[str, ...]) -> str:
    """The longest prefix of ``text`` that no later token can change or cut: without a
    trailing U+FFFD (a character whose remaining bytes may still come), before the first stop
    string it holds, and without a suffix that may be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == REPLACEMENT:
        end -= 1
    text = text[:end]
    found = [text.find(s) for s in stop if s in text]
    if found:
        return text[: min(found)]
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), hold, -1):  # longest first
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold]


class TextStream:
    """One sequence's text, as deltas safe to send while it is generated.

    ``push(tokens, None)`` after each new token returns the text that can be sent now;
    ``push(tokens, final_text)`` when it has ended returns the rest of the final text (the
    engine's: cut before the stop string, without EOD). The deltas, joined, are the final text:
    nothing sent is ever taken back (a stop string's start is held until it is ruled out).

    The text so far is ``detokenize(tokens)``. For a byte-level BPE tokenizer (``detokenize``
    a bound method of one, see :func:`~.api.is_byte_level`) whose text is the UTF-8 decoding
    of its tokens' bytes put together, it is built incrementally: tokens whose text has no
    U+FFFD (complete characters) are decoded once, in runs of ``commit_every``.
    """

    def __init__(
        self,
        detokenize: Callable[[list[int]], str],
        stop: tuple[str, ...] = (),
        commit_every: int = 32,
    ):
        from mtnlg.inference.api import is_byte_level

        self.detokenize, self.stop = detokenize, tuple(stop)
        self.incremental = is_byte_level(getattr(detokenize, "__self__", None))
        self.commit_every = commit_every
        self.base, self.base_text = 0, ""  # tokens[:base] decode to base_text, complete
        self.sent = ""
        self.finished = False

    def text(self, tokens: list[int]) -> str:
        """``detokenize(tokens)``."""
        if not self.incremental:
            return self.detokenize(tokens)
        tail = self.detokenize(tokens[self.base :])
        text = self.base_text + tail
        if len(tokens) - self.base >= self.commit_every and REPLACEMENT not in tail:
            self.base, self.base_text = len(tokens), text
        return text

    def push(self, tokens: list[int], finished_text: str | None = None) -> str:
        if self.finished:
            return ""
        if finished_text is not None:
            self.finished = True
            rest = finished_text[len(self.sent) :]
            self.sent = finished_text
            return rest
        safe = safe_text(self.text(tokens), self.stop)
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent) :], safe
        return delta


# ---- chunks


def completion_chunk(
    id: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict | None = None,
) -> dict:
    """A ``/v1/completions`` stream chunk for choice ``index`` (``logprobs``: the legacy object
    of this chunk's tokens, :func:`~.api.completion_logprobs`)."""
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def chat_chunk(
    id: str,
    created: int,
    model: str,
    index: int,
    delta: dict,
    finish_reason: str | None,
    logprobs: dict | None = None,
) -> dict:
    """A ``/v1/chat/completions`` stream chunk for choice ``index``: ``delta`` is
    :data:`ROLE_DELTA` first, then ``{"content": text}`` (``{}`` with the finish reason);
    ``logprobs``: ``{"content": [...]}`` of this chunk's tokens (:func:`~.api.chat_logprobs`)."""
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(id: str, created: int, model: str, object: str, usage: dict) -> dict:
    """The last chunk with ``stream_options.include_usage``: no choices, the usage
    (``object``: ``text_completion`` or ``chat.completion.chunk``)."""
    return {
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    }


def sse(obj: dict) -> bytes:
    """One Server-Sent Event: ``data: {json}`` and a blank line."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n\n"


def error_event(e: APIError) -> bytes:
    """An error once the stream has started (the status line is already sent)."""
    return sse(error_body(e.message, e.param, e.kind, e.code))
