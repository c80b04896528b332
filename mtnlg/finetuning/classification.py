"""Classification data: records -> (token ids, label index), batches, and the dev metrics.

Texts come from ``--text-column`` and labels from ``--label-column`` of any source
``records.read_records`` reads. Labels are compared as strings (a JSON ``1`` is the label
``"1"``); the label set is ``--labels`` or the sorted set of training labels (numerically when
they all are integers). Every record is checked before any training: a missing column, a label
outside the set, an empty (or blank) text, or a text longer than ``--seq-length`` tokens without
``--truncate`` is a ``DataError`` naming the file and line.

Texts are tokenized exactly as read, whitespace and all (an SST-2 sentence's trailing space
is a token): the ids are those ``transformers``' tokenizer gives for the same raw text, so the
exported model's users get the logged dev metrics and ``--predict``'s labels.

A micro-batch is right-padded to ``seq_length`` with the pad id (the tokenizer's EOD) and its
targets are (m, 2) ``[label, last_index]``, the index picked as ``GPT2ForSequenceClassification``
does (the rightmost non-pad token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtnlg.finetuning.records import DataError, RecordSource, field, read_records
from mtnlg.model.classification import last_token_index


@dataclass(frozen=True)
class ClassExample:
    ids: list[int]
    """Token ids, 1 <= len <= seq_length."""
    label: int
    """Index into the label set (-1 when the input has no label: prediction)."""
    where: str
    """``FILE:LINE`` of the record."""


@dataclass(frozen=True)
class ColumnSpec:
    text: str = "sentence"
    label: str = "label"


def label_key(value) -> str:
    """A label as a string: ``1`` (JSON int) and ``"1"`` (TSV) are the same label."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(type(value).__name__)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _label(record, cols: ColumnSpec) -> str:
    value = field(record, cols.label, "--label-column")
    try:
        key = label_key(value)
    except TypeError as e:
        raise DataError(
            f"{record.where}: label {value!r} is a {e}, not a string or number"
        ) from None
    if not key:
        raise DataError(f"{record.where}: empty label (--label-column {cols.label!r})")
    return key


def sorted_labels(keys) -> list[str]:
    """Numerically when every label is an integer, else as strings."""
    keys = set(keys)
    try:
        return sorted(keys, key=int)
    except ValueError:
        return sorted(keys)


def collect_labels(source: RecordSource, cols: ColumnSpec) -> list[str]:
    """The label set of a training source."""
    return sorted_labels(_label(r, cols) for r in read_records(source))


def parse_labels(text: str) -> list[str]:
    """``--labels negative,positive`` -> the label list (order = class index)."""
    labels = [t.strip() for t in text.split(",")]
    if len(labels) < 2 or any(not t for t in labels) or len(set(labels)) != len(labels):
        raise DataError(f"--labels {text!r}: give two or more distinct, non-empty labels")
    return labels


def tokenize_text(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` exactly as given, surrounding whitespace included: what the exported
    tokenizer (``AutoTokenizer``, no special tokens added) gives for the same raw text, so the
    run trains, evaluates and predicts on the tokens users of the export feed the model."""
    return tokenizer.tokenize(text)


def read_examples(
    source: RecordSource,
    tokenizer,
    seq_length: int,
    cols: ColumnSpec,
    labels: list[str] | None,
    truncate: bool,
) -> list[ClassExample]:
    """Every record of ``source`` checked and tokenized; ``labels=None``: no label column read
    (prediction). Raises ``DataError`` at the first bad record."""
    index = {label: i for i, label in enumerate(labels)} if labels is not None else None
    out = []
    for record in read_records(source):
        text = field(record, cols.text, "--text-column")
        if not isinstance(text, str):
            raise DataError(f"{record.where}: text is a {type(text).__name__}, not a string")
        if not text.strip():  # the text itself is tokenized as is (see ``tokenize_text``)
            raise DataError(f"{record.where}: empty text (--text-column {cols.text!r})")
        label = -1
        if index is not None:
            key = _label(record, cols)
            if key not in index:
                raise DataError(
                    f"{record.where}: label {key!r} is not in the label set "
                    f"{list(index)} (--labels, or the labels of --train-data)"
                )
            label = index[key]
        ids = tokenize_text(tokenizer, text)
        if len(ids) > seq_length:
            if not truncate:
                raise DataError(
                    f"{record.where}: {len(ids)} tokens exceed --seq-length {seq_length} "
                    "(pass --truncate to keep the first --seq-length tokens)"
                )
            ids = ids[:seq_length]
        out.append(ClassExample(ids, label, record.where))
    if not out:
        raise DataError(f"{source.describe()}: no records")
    return out


def micro_batch(
    examples: list[ClassExample], seq_length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, s) right-padded ids, (m, 2) int64 targets ``[label, last_index]``."""
    ids = torch.full((len(examples), seq_length), pad_id, dtype=torch.int64)
    for row, ex in enumerate(examples):
        ids[row, : len(ex.ids)] = torch.tensor(ex.ids, dtype=torch.int64)
    labels = torch.tensor([max(ex.label, 0) for ex in examples], dtype=torch.int64)
    return ids, torch.stack([labels, last_token_index(ids, pad_id)], dim=1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict:
    """Accuracy, macro-F1 over the whole label set, and mean cross-entropy.

    logits: (n, C); labels: (n,). Per class F1 = 2TP / (2TP + FP + FN), 0 when the class is
    neither present nor predicted (scikit-learn's ``zero_division=0`` with ``labels=`` the set).
    """
    logits = logits.float()
    pred = logits.argmax(-1)
    f1s = []
    for c in range(num_labels):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {
        "val_loss": float(torch.nn.functional.cross_entropy(logits, labels)),
        "val_accuracy": int((pred == labels).sum()) / len(labels),
        "val_f1": sum(f1s) / num_labels,
    }
