"""The two tasks as the loop sees them: examples, micro-batches and dev evaluation.

Data is read, tokenized and validated on rank 0 only and broadcast, so a bad record stops every
rank with one message naming it, before any training.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist

from mtnlg.finetuning.classification import (
    ClassExample,
    ColumnSpec,
    classification_metrics,
    collect_labels,
    micro_batch,
    parse_labels,
    read_examples,
)
from mtnlg.finetuning.loop import Task, dev_slices, eval_outputs, share_rows
from mtnlg.finetuning.records import DataError
from mtnlg.model.classification import pooled


def on_rank0(build):
    """``build()`` on rank 0, its result broadcast; a DataError exits every rank non-zero."""
    payload: list = [None]
    if dist.get_rank() == 0:
        try:
            payload = [("ok", build())]
        except DataError as e:
            payload = [("error", str(e))]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise SystemExit(f"error: {value}")
    return value


def classification_data(args, tokenizer, seq: int, train_src, valid_src, ckpt_labels):
    """(labels, train examples, dev examples or None), validated on rank 0."""
    cols = ColumnSpec(args.text_column, args.label_column)

    def build():
        labels = parse_labels(args.labels) if args.labels else None
        if ckpt_labels is not None:
            if labels is not None and labels != ckpt_labels:
                raise DataError(
                    f"--labels {labels} differ from the --load checkpoint's {ckpt_labels}"
                )
            labels = ckpt_labels
        labels = labels or collect_labels(train_src, cols)
        if len(labels) < 2:
            raise DataError(f"{train_src.describe()}: one label only ({labels}); need two or more")
        train = read_examples(train_src, tokenizer, seq, cols, labels, args.truncate)
        valid = None
        if valid_src is not None:
            valid = read_examples(valid_src, tokenizer, seq, cols, labels, args.truncate)
        return labels, train, valid

    return on_rank0(build)


def classify_rows(
    engine, topo, examples: list[ClassExample], micro: int, seq: int, pad: int, n_labels: int
):
    """(n, C) fp32 logits of every example, on every rank (all ranks call it)."""
    n = len(examples)
    padded, firsts = dev_slices(n, micro, topo)
    ex = examples + [examples[0]] * (padded - n)
    batches = [micro_batch(ex[f : f + micro], seq, pad) for f in firsts]
    outs = eval_outputs(engine, topo, batches, compute_loss=False)
    rows = torch.zeros(padded, n_labels)
    if outs is not None:
        for f, (_, targets), out in zip(firsts, batches, outs):
            rows[f : f + micro] = pooled(out.detach().float().cpu(), targets[:, 1])
    rows = share_rows(rows, outs is not None and topo.tp_rank == 0, engine.device)
    return rows[:n]


def classification_task(train, valid, labels, micro, seq, pad, best_metric) -> Task:
    n_labels = len(labels)

    def evaluate(engine, topo) -> dict:
        logits = classify_rows(engine, topo, valid, micro, seq, pad, n_labels)
        gold = torch.tensor([e.label for e in valid], dtype=torch.int64)
        return classification_metrics(logits, gold, n_labels)

    return Task(
        train=train,
        batch=lambda exs: micro_batch(exs, seq, pad),
        evaluate=evaluate if valid else None,
        best_metric=best_metric,
    )


def sft_data(args, tokenizer, seq: int, train_src, valid_src):
    from mtnlg.finetuning.chat import build_chat_examples
    from mtnlg.finetuning.sft import build_sft_examples, sft_summary

    def examples(src):
        if not args.chat_template:
            return build_sft_examples(src, tokenizer, seq, args, log=sys.stderr)
        out = build_chat_examples(src, tokenizer, seq, args)
        print(f"{src.describe()}: {sft_summary(out)} (chat template)", file=sys.stderr)
        return out

    def build():
        train = examples(train_src)
        valid = examples(valid_src) if valid_src is not None else None
        return train, valid

    return on_rank0(build)


def sft_task(train, valid, micro, seq, pad) -> Task:
    from mtnlg.finetuning.sft import sft_micro_batch

    def batch(exs):
        ids, (labels, mask) = sft_micro_batch(exs, micro, seq, pad)
        return ids, (labels, mask)

    def evaluate(engine, topo) -> dict:
        """Per-token dev loss: the summed NLL of every response token (and EOD) of the dev set
        over their number, so it does not depend on the micro-batch size. Each micro-batch's
        loss is its masked token mean (``GPTModel``'s loss), weighted back by its token count;
        filler rows have a zero loss mask."""
        n = len(valid)
        padded, firsts = dev_slices(n, micro, topo)
        batches, tokens = [], []
        for f in firsts:
            chunk = valid[f : f + micro] or valid[:1]
            ids, (labels, mask) = sft_micro_batch(chunk, micro, seq, pad)
            mask[max(0, min(micro, n - f)) :] = 0.0
            tokens.append(float(mask.sum()))
            batches.append((ids, (labels, mask)))
        outs = eval_outputs(engine, topo, batches, compute_loss=True)
        rows = torch.zeros(padded // micro, 2)
        if outs is not None:
            for f, t, loss in zip(firsts, tokens, outs):
                rows[f // micro] = torch.tensor([float(loss) * t, t])
        rows = share_rows(rows, outs is not None and topo.tp_rank == 0, engine.device)
        loss = float(rows[:, 0].sum() / rows[:, 1].sum())
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    return Task(train=train, batch=batch, evaluate=evaluate if valid else None)
