"""SFT on chat records with the model's own chat template (``--task sft --chat-template``).

A record is ``{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str},
...]}`` (the column ``--messages-key``). The text the model reads is the tokenizer's chat
template applied to the whole conversation, rendered by ``transformers``' own
``apply_chat_template`` (its Jinja environment and globals) and tokenized by the run's tokenizer,
so the ids are exactly ``AutoTokenizer.apply_chat_template(messages, tokenize=True)``'s.

The loss counts the assistant turns only: for assistant message ``i`` the tokens between the
rendering of ``messages[:i]`` with the generation prompt (``add_generation_prompt=True``: the
context up to where the model starts writing) and the rendering of ``messages[:i + 1]`` (the
turn, its end-of-turn token included). A template that does not render each prefix as a prefix
of the whole conversation (its tokens) cannot be masked this way and the record is refused,
naming it. Over-long conversations are refused, or with ``--truncate`` cut on the right.
"""

from __future__ import annotations

import tempfile

import numpy as np

from mtnlg.finetuning.records import DataError, Record, RecordSource, field, read_records
from mtnlg.finetuning.sft import SFTExample

ROLES = ("system", "user", "assistant", "tool")


def template_renderer(tokenizer):
    """A ``transformers`` tokenizer built from the run's tokenizer files: it renders the
    template (its ``chat_template`` is the one carried with the checkpoint or HF folder)."""
    from transformers import AutoTokenizer

    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "--chat-template: the tokenizer has no chat template (chat_template.jinja, or "
            "chat_template in tokenizer_config.json, in the model folder)"
        )
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        return AutoTokenizer.from_pretrained(d)


def messages_of(record: Record, key: str) -> list[dict]:
    """The record's messages, validated: a list of {"role", "content"} with one assistant turn
    or more; DataError naming the record and the message."""
    msgs = field(record, key, "--messages-key")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{record.where}: {key} must be a non-empty list of messages")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m:
            raise DataError(f"{record.where}: {key}[{j}] must be {{'role', 'content'}}")
        if m["role"] not in ROLES:
            raise DataError(f"{record.where}: {key}[{j}] role {m['role']!r}: one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{record.where}: {key}[{j}] content must be a string")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{record.where}: {key} has no assistant message: nothing to learn")
    return msgs


def chat_example(record: Record, msgs: list[dict], render, tokenizer, seq: int, truncate: bool):
    """(SFTExample with a per-token loss mask) of one conversation."""

    def ids_of(messages, generation_prompt=False) -> list[int]:
        text = render.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return tokenizer.tokenize(text) if text else []

    ids = ids_of(msgs)
    mask = np.zeros(len(ids), dtype=np.int8)  # 1: a token the loss counts (an assistant turn)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, end = ids_of(msgs[:i], True), ids_of(msgs[: i + 1])
        if ids[: len(start)] != start or ids[: len(end)] != end or len(end) < len(start):
            raise DataError(
                f"{record.where}: the chat template does not render messages[:{i}] as a prefix "
                "of the whole conversation, so its assistant tokens cannot be located"
            )
        mask[len(start) : len(end)] = 1
    cut = ""
    if len(ids) > seq + 1:
        if not truncate:
            raise DataError(
                f"{record.where}: {len(ids)} tokens, more than --seq-length {seq} + 1; "
                "shorten it, raise --seq-length or pass --truncate (cuts on the right)"
            )
        ids, mask, cut = ids[: seq + 1], mask[: seq + 1], "response"
    if not mask[1:].any():
        raise DataError(f"{record.where}: no assistant token left to learn (after the cut)")
    first = int(np.argmax(mask))  # tokens before it: context only
    return SFTExample(record.where, np.asarray(ids, dtype=np.int32), first, cut, mask)


def build_chat_examples(source: RecordSource, tokenizer, seq: int, args) -> list[SFTExample]:
    """Every record of ``source`` rendered, tokenized, masked and validated (before training)."""
    render = template_renderer(tokenizer)
    truncate = bool(getattr(args, "truncate", False))
    out = [
        chat_example(rec, messages_of(rec, args.messages_key), render, tokenizer, seq, truncate)
        for rec in read_records(source)
    ]
    if not out:
        raise DataError(f"{source.describe()}: no records")
    return out
