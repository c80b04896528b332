"""``finetune.py --task classification --predict INPUT --load CKPT --output OUT``.

Loads a classifier checkpoint at any TP x PP (weights merged and re-cut by the converter's
reader), classifies every text of INPUT (records with ``--text-column``, or a ``.txt`` file
with one text per line) and writes one label per line to OUT (temp file, then renamed).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from mtnlg.distributed.topology import ParallelConfigError, ParallelDims, Topology
from mtnlg.finetuning.classification import ClassExample, ColumnSpec, read_examples, tokenize_text
from mtnlg.finetuning.records import DataError, RecordSource
from mtnlg.finetuning.start import model_builder, resolve_start
from mtnlg.finetuning.tasks import classify_rows, on_rank0
from mtnlg.training.setup import build_engine


def read_inputs(args, tokenizer, seq: int) -> list[ClassExample]:
    """The texts to classify (no labels), checked like training data."""
    path = Path(args.predict)
    if path.suffix.lower() != ".txt":
        source = RecordSource(path=str(path))
        cols = ColumnSpec(args.text_column, args.label_column)
        return read_examples(source, tokenizer, seq, cols, None, args.truncate)
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            # only the line break is dropped: the text is tokenized as is (like training)
            where, text = f"{path}:{lineno}", line.removesuffix("\n").removesuffix("\r")
            if not text.strip():
                raise DataError(f"{where}: empty text")
            ids = tokenize_text(tokenizer, text)
            if len(ids) > seq and not args.truncate:
                raise DataError(f"{where}: {len(ids)} tokens exceed --seq-length {seq}")
            out.append(ClassExample(ids[:seq], -1, where))
    if not out:
        raise DataError(f"{path}: no lines")
    return out


def predict(args) -> list[str]:
    """Every rank returns the predicted labels; rank 0 writes them."""
    start = resolve_start(args)
    if start.labels is None:
        raise SystemExit(f"error: --load {args.load}: not a classifier checkpoint")
    cfg, tokenizer, seq = start.cfg, start.tokenizer, start.cfg.seq_length
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    try:
        dims = ParallelDims(world_size=dist.get_world_size(), tp=tp, pp=pp)
        dims.validate_config(cfg)
    except ParallelConfigError as e:
        raise SystemExit(f"error: {e}") from None
    examples = on_rank0(lambda: read_inputs(args, tokenizer, seq))
    topo = Topology(dims)
    micro = args.micro_batch_size
    ds_config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * dims.dp,
        "steps_per_print": 10**9,
    }
    if args.bf16:
        ds_config["bf16"] = {"enabled": True}
    engine = build_engine(
        cfg,
        topo,
        ds_config,
        seed=args.seed,
        checkpoint_activations=False,
        weight_decay=0.0,
        training=False,
        build_model=model_builder(start, len(start.labels)),
    )
    start.full = None  # copied into the engine: free the host copy
    pad = start.pad_token_id if start.pad_token_id is not None else tokenizer.eod
    logits = classify_rows(engine, topo, examples, micro, seq, pad, len(start.labels))
    labels = [start.labels[i] for i in logits.argmax(-1).tolist()]
    if topo.rank == 0:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
        os.replace(tmp, out)
        print(f"wrote {len(labels)} labels to {out}", flush=True)
    return labels
