"""finetune.py's driver: flags -> start weights -> validated data -> DeepSpeed engine -> loop.

Order: flags are checked, then the starting weights and tokenizer are read and the data is
read, tokenized and validated (rank 0, broadcast); only then is the engine built. A bad record
stops every rank with ``error: FILE:LINE: ...`` and a non-zero exit before any training.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch.distributed as dist

from mtnlg.distributed.init import init_distributed, shutdown
from mtnlg.distributed.topology import ParallelConfigError, ParallelDims, Topology
from mtnlg.finetuning.arguments import (
    BEST_METRICS,
    build_finetune_parser,
    check_flags,
    data_sources,
)
from mtnlg.finetuning.loop import FinetuneConfig, Outcome, finetune
from mtnlg.finetuning.start import Start, model_builder, resolve_start
from mtnlg.finetuning.tasks import classification_data, classification_task, sft_data, sft_task
from mtnlg.training.arguments import apply_kernel_flags
from mtnlg.training.metrics import MetricsLogger
from mtnlg.training.pretrain import check_peak_tflops
from mtnlg.training.runconfig import checkpoint_meta, schedules
from mtnlg.training.setup import (
    batch_sizes,
    build_engine,
    check_zero_with_pipeline,
    resolve_ds_config,
)


def run(argv: list[str] | None = None, description: str = __doc__):
    args = build_finetune_parser(description).parse_args(argv)
    apply_kernel_flags(args)
    try:
        check_flags(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    init_distributed(args.distributed_timeout_minutes)
    try:
        if args.predict:
            from mtnlg.finetuning.predict import predict

            return predict(args)
        return _run(args)
    finally:
        shutdown()


def _layout(args, start: Start) -> ParallelDims:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cfg = start.cfg
    ParallelDims(world_size=tp * pp, tp=tp, pp=pp).validate_config(cfg)
    return ParallelDims(world_size=dist.get_world_size(), tp=tp, pp=pp)


def _run(args: argparse.Namespace) -> Outcome:
    start = resolve_start(args)
    cfg, tokenizer, seq = start.cfg, start.tokenizer, start.cfg.seq_length
    try:
        dims = _layout(args, start)
        check_zero_with_pipeline(args)
        check_peak_tflops(args)
        batch = batch_sizes(args, dims)
        train_src, valid_src = data_sources(args)
    except (ParallelConfigError, ValueError) as e:  # DataError is a ValueError
        raise SystemExit(f"error: {e}") from None
    pad = start.pad_token_id if start.pad_token_id is not None else tokenizer.eod
    if args.export_hf:  # what the export step writes must be writable now, before training
        from mtnlg.checkpoint import CheckpointError
        from mtnlg.checkpoint.hf import check_hf_tokenizer_export

        try:
            check_hf_tokenizer_export(
                tokenizer, cfg, pad if args.task == "classification" else None
            )
        except CheckpointError as e:
            raise SystemExit(f"error: --export-hf {args.export_hf}: {e}") from None
    labels = None
    if args.task == "classification":
        labels, train, valid = classification_data(
            args, tokenizer, seq, train_src, valid_src, start.labels
        )
        metric = BEST_METRICS[args.best_metric or "accuracy"]
        task = classification_task(train, valid, labels, batch.micro, seq, pad, metric)
    else:
        train, valid = sft_data(args, tokenizer, seq, train_src, valid_src)
        task = sft_task(train, valid, batch.micro, seq, pad)
    if args.epochs is not None:
        args.train_iters = max(1, math.ceil(args.epochs * len(train) / batch.final_global))
    try:
        _, train_iters, schedule = schedules(args, batch, dims)
        ds_config = resolve_ds_config(args, dims, batch)
    except (ParallelConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

    topo = Topology(dims)
    engine = build_engine(
        cfg,
        topo,
        ds_config,
        seed=args.seed,
        checkpoint_activations=args.checkpoint_activations,
        weight_decay=args.weight_decay,
        build_model=model_builder(start, len(labels) if labels else None),
    )
    start.full = None  # copied into the engine: free the host copy
    if topo.rank == 0:
        print(
            f"fine-tuning ({args.task}) from {start.source}: weights only; the optimizer starts "
            f"fresh (no optimizer state, LR schedule or progress is loaded) | {len(train)} "
            f"training examples, {train_iters} iterations of {batch.final_global}",
            flush=True,
        )
    meta = checkpoint_meta(args, cfg, dims, batch, ds_config, schedule)
    meta["finetune"] = {
        "task": args.task,
        "start": start.source,
        "train_data": train_src.describe(),
        "valid_data": valid_src.describe() if valid_src else None,
    }
    if labels:
        meta["classification"] = {
            "labels": labels,
            "pad_token_id": pad,
            "text_column": args.text_column,
            "label_column": args.label_column,
        }
    loop = FinetuneConfig(
        train_iters=train_iters,
        micro_batch=batch.micro,
        global_batch=batch.final_global,
        seq_length=seq,
        seed=args.seed,
        log_interval=args.log_interval,
        eval_interval=args.eval_interval,
        save=args.save,
        early_stop_patience=args.early_stop_patience,
        progress_bar=not args.no_progress,
        max_consecutive_nonfinite=args.max_consecutive_nonfinite,
    )
    logger = MetricsLogger.from_args(args, enabled=topo.rank == 0)
    try:
        outcome = finetune(engine, topo, task, loop, schedule, meta, tokenizer, logger)
    finally:
        logger.close()
    if args.export_hf:
        export(args, topo, outcome)
    return outcome


def export(args, topo, outcome: Outcome) -> None:
    """Rank 0 writes the best checkpoint (else the final one) as a Hugging Face folder."""
    best = outcome.best and outcome.best.get("tag")
    src = Path(args.save) / "best" if best else Path(args.save)
    if topo.rank == 0:
        export_checkpoint(src, args.export_hf)
        which = f"best (iteration {outcome.best['iteration']})" if best else "final"
        print(f"exported the {which} model to {args.export_hf}", flush=True)
    dist.barrier()


def export_checkpoint(src: Path, out: str) -> None:
    """An mtnlg checkpoint -> ``GPT2ForSequenceClassification`` (classifier checkpoints) or
    ``GPT2LMHeadModel`` folder, through the converter (the optimizer state is left behind)."""
    from mtnlg.checkpoint.convert import mtnlg_to_hf

    mtnlg_to_hf(str(src), out, weights_only=True)
