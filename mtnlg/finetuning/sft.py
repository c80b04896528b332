"""Supervised fine-tuning (``--task sft``) data: prompt/response records -> masked LM batches.

Each record gives a prompt and a response (columns ``--prompt-key`` / ``--response-key``). The
text the model reads is::

    PROMPT_TEMPLATE.format(columns, prompt=<prompt column>) + RESPONSE_SEPARATOR | response | EOD
    \\------------------ prompt part: context, no loss -------------------/   \\- loss here -/

with defaults ``"{prompt}"`` and ``"\\n"``, i.e. ``prompt \\n response <|endoftext|>``. The two
parts are tokenized separately and concatenated, so the prompt's tokens are exactly what a user
feeds at generation time (the rendered prompt and separator) and the model learns to write the
response and then stop (EOD). The loss counts the response tokens and the EOD only.

Every example sits alone in its own row, padded on the right to ``--seq-length``: under causal
attention no real token sees the padding, and positions restart at 0 in each row, so nothing
crosses examples. Packing several examples into one row is *not* offered: ``GPTModel`` takes no
attention mask or position ids, so packed examples would attend to each other.

Every record is validated before training starts (``DataError`` naming ``file:line``): missing
columns, empty (blank) prompt or response, and examples longer than ``--seq-length`` + 1 tokens
(a row of ``s`` inputs predicts ``s`` next tokens). With ``--truncate`` an over-long example is
cut instead: the prompt loses tokens from its *left* (the text nearest the response, and the
template's tail such as ``Answer:``, is kept); only when the response alone leaves the prompt
less than half the row is the prompt kept at ``seq_length // 2`` tokens and the response cut on
the right (its EOD is then dropped: the text did not end there). The counts are logged.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mtnlg.finetuning.records import DataError, Record, RecordSource, field, read_records

CHUNK = 512  # records tokenized per batch call


@dataclass(frozen=True)
class SFTExample:
    """One tokenized example: prompt tokens (no loss) then response tokens (loss)."""

    where: str
    """The record it came from (``file:line`` or ``hf:NAME[split]#row``)."""
    ids: np.ndarray
    """int32 token ids: the prompt part, then the response and (unless cut) the EOD."""
    prompt_len: int
    """Number of prompt-part tokens at the start of ``ids`` (>= 1)."""
    truncated: str = ""
    """``""``, ``"prompt"`` (left-truncated) or ``"response"`` (prompt shortened and the
    response cut on the right)."""
    mask: np.ndarray | None = None
    """Per token of ``ids``, 1 where the loss counts it (chat: the assistant turns,
    ``mtnlg.finetuning.chat``); None: every token from ``prompt_len`` on."""

    @property
    def response_len(self) -> int:
        if self.mask is not None:
            return int(self.mask.sum())
        return len(self.ids) - self.prompt_len


def add_sft_arguments(parser) -> None:
    """The ``--task sft`` flags (``--seq-length``, ``--truncate`` come from the driver)."""
    g = parser.add_argument_group("supervised fine-tuning (--task sft)")
    g.add_argument("--prompt-key", default="prompt", help="prompt column (default: prompt)")
    g.add_argument("--response-key", default="response", help="response column")
    g.add_argument(
        "--prompt-template",
        default="{prompt}",
        help="Python format string over the record's columns; {prompt} is the --prompt-key "
        "column, e.g. 'Question: {prompt}\\nAnswer:' (\\n, \\t, \\\\ escapes understood; "
        "default: {prompt})",
    )
    g.add_argument(
        "--chat-template",
        action="store_true",
        help="records are chat conversations ({'messages': [{'role', 'content'}, ...]}) "
        "formatted with the tokenizer's own chat template (transformers' apply_chat_template); "
        "the loss counts the assistant turns only",
    )
    g.add_argument("--messages-key", default="messages", help="with --chat-template: the column")
    g.add_argument(
        "--response-separator",
        default="\\n",
        help="text between the rendered prompt and the response, part of the prompt "
        "(no loss); default: a newline",
    )


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` as typed on a command line -> the characters."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def check_template(template: str) -> None:
    """Named, plain column fields only (``{prompt}``, ``{title}``), no ``{0}`` or ``{a.b}``."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"--prompt-template {template!r}: {e}") from None
    for name in names:
        if not re.fullmatch(r"[^\d.\[\]{}][^.\[\]{}]*", name):
            raise DataError(f"--prompt-template {template!r}: field {{{name}}} must name a column")


def render_prompt(record: Record, args) -> str:
    """The prompt part of ``record``'s text: template + separator (what generation feeds)."""
    prompt = _text(record, args.prompt_key, "--prompt-key", "prompt")
    columns = dict(record.fields, prompt=prompt)
    try:
        text = unescape(args.prompt_template).format_map(columns)
    except KeyError as e:
        cols = ", ".join(map(str, record.fields))
        raise DataError(
            f"{record.where}: --prompt-template names column {e.args[0]!r}; columns: {cols}"
        ) from None
    return text + unescape(args.response_separator)


def _text(record: Record, column: str, flag: str, what: str) -> str:
    value = field(record, column, flag)
    if not isinstance(value, str):
        raise DataError(f"{record.where}: {what} ({flag} {column}) is {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{record.where}: empty {what} ({flag} {column})")
    return value


def _chunks(records: Iterator[Record]) -> Iterator[list[Record]]:
    chunk = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def fit(prompt: list[int], response: list[int], seq_length: int) -> tuple[list, list, str]:
    """Cut ``prompt`` / ``response`` (EOD included) to ``seq_length + 1`` tokens (see module)."""
    budget = seq_length + 1
    if len(prompt) + len(response) <= budget:
        return prompt, response, ""
    keep = max(budget - len(response), min(len(prompt), max(seq_length // 2, 1)))
    if keep < len(prompt) and keep + len(response) <= budget:
        return prompt[-keep:], response, "prompt"
    keep = min(keep, len(prompt))
    return prompt[len(prompt) - keep :], response[: budget - keep], "response"


def build_sft_examples(
    source: RecordSource, tokenizer, seq_length: int, args, log=None
) -> list[SFTExample]:
    """Read, render, tokenize and validate every record of ``source`` (before any training).

    ``args``: ``prompt_key``, ``response_key``, ``prompt_template``, ``response_separator``
    (:func:`add_sft_arguments`) and ``truncate``. ``log``: a stream for a summary line and a
    tqdm bar (pass it on rank 0 only). Raises ``DataError`` naming the record at fault.
    """
    check_template(unescape(args.prompt_template))
    truncate = bool(getattr(args, "truncate", False))
    eod = tokenizer.eod
    bar = _progress(log)
    examples: list[SFTExample] = []
    for chunk in _chunks(read_records(source)):
        prompts = [render_prompt(rec, args) for rec in chunk]
        responses = [_text(rec, args.response_key, "--response-key", "response") for rec in chunk]
        p_ids = tokenizer.tokenize_batch(prompts)
        r_ids = tokenizer.tokenize_batch(responses)
        for rec, p, r in zip(chunk, p_ids, r_ids, strict=True):
            r = [*r, eod]
            if len(p) + len(r) > seq_length + 1 and not truncate:
                raise DataError(
                    f"{rec.where}: {len(p) + len(r)} tokens (prompt {len(p)} + response "
                    f"{len(r)} with EOD), more than --seq-length {seq_length} + 1; "
                    "shorten it, raise --seq-length or pass --truncate"
                )
            p, r, cut = fit(p, r, seq_length)
            ids = np.asarray(p + r, dtype=np.int32)
            examples.append(SFTExample(rec.where, ids, len(p), cut))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if not examples:
        raise DataError(f"{source.describe()}: no records")
    if log is not None:
        print(f"{source.describe()}: {sft_summary(examples)}", file=log, flush=True)
    return examples


def _progress(log):
    if log is None:
        return None
    from tqdm import tqdm

    return tqdm(unit=" records", file=log, leave=False, disable=None)  # None: off unless a tty


def sft_summary(examples: list[SFTExample]) -> str:
    """``N examples, T response tokens (with EOD); P prompts left-truncated; R responses cut``."""
    cut = [e.truncated for e in examples]
    tokens = sum(e.response_len for e in examples)
    text = f"{len(examples)} examples, {tokens} response tokens (with EOD)"
    if cut.count("prompt"):
        text += f"; {cut.count('prompt')} prompts left-truncated"
    if cut.count("response"):
        text += (
            f"; {cut.count('response')} responses cut on the right (prompt kept at "
            "seq_length // 2 tokens or fewer, EOD dropped)"
        )
    return text if any(cut) else text + "; none truncated"


def sft_micro_batch(
    examples: list[SFTExample], micro: int, seq_length: int, pad_id: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``(ids, (labels, loss_mask))``, each (micro, seq_length), one example per row.

    Row ``i`` holds ``examples[i]``'s tokens ``t``: ids ``t[:-1]``, labels ``t[1:]``, then
    ``pad_id``; the mask is 1 exactly where the label is a response token or the EOD. Rows past
    ``len(examples)`` (a short last batch) are all padding with a zero mask.
    """
    if not 0 < len(examples) <= micro:
        raise ValueError(f"{len(examples)} examples for a micro-batch of {micro}")
    ids = torch.full((micro, seq_length), pad_id, dtype=torch.long)  # (m, s)
    labels = torch.full((micro, seq_length), pad_id, dtype=torch.long)  # (m, s)
    mask = torch.zeros((micro, seq_length), dtype=torch.float)  # (m, s)
    for row, ex in enumerate(examples):
        t = torch.from_numpy(ex.ids.astype(np.int64))
        n = len(t) - 1  # positions used: each predicts the next token
        if n > seq_length:
            raise ValueError(f"{ex.where}: {len(t)} tokens do not fit seq_length {seq_length}")
        ids[row, :n] = t[:-1]
        labels[row, :n] = t[1:]
        if ex.mask is not None:  # position j predicts t[j + 1]: counted if that token is
            mask[row, :n] = torch.from_numpy(ex.mask[1 : n + 1].astype(np.float32))
        else:
            mask[row, ex.prompt_len - 1 : n] = 1.0  # position j predicts t[j + 1]
    return ids, (labels, mask)
