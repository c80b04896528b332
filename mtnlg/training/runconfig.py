"""What pretraining and distillation resolve the same way from their flags.

The iteration count and LR schedule (with ramp-up), the loop settings, and the training part of
the checkpoint metadata, so both drivers build them once, identically.
"""

from __future__ import annotations

import argparse

from mtnlg.config import ModelConfig
from mtnlg.distributed.topology import ParallelDims
from mtnlg.training.loop import LoopConfig
from mtnlg.training.schedules import BatchRampup, LRSchedule
from mtnlg.training.setup import BatchSizes


def schedules(
    args: argparse.Namespace, batch: BatchSizes, dims: ParallelDims
) -> tuple[BatchRampup, int, LRSchedule]:
    """(batch ramp, number of iterations, LR schedule); raises ValueError naming the flag."""
    ramp = BatchRampup.from_args(batch.final_global, args.rampup_batch_size)
    ramp.check(batch.micro, dims.dp)
    if args.train_iters is not None:
        train_iters = args.train_iters
    elif args.train_samples is not None:
        train_iters = ramp.num_iterations_for_samples(args.train_samples)
    else:
        raise ValueError("give --train-iters or --train-samples")
    tokens_mode = args.lr_warmup_tokens is not None or args.lr_decay_tokens is not None
    schedule = LRSchedule(
        lr=args.lr,
        min_lr=args.min_lr,
        decay_style=args.lr_decay_style,
        warmup_iters=0 if tokens_mode else args.lr_warmup_iters,
        decay_iters=None if tokens_mode else (args.lr_decay_iters or train_iters),
        warmup_tokens=args.lr_warmup_tokens if tokens_mode else None,
        decay_tokens=args.lr_decay_tokens if tokens_mode else None,
    )
    return ramp, train_iters, schedule


def dataset_samples(args, ramp: BatchRampup, train_iters: int) -> tuple[int, int, int]:
    """Samples the (train, valid, test) datasets must provide."""
    eval_samples = args.eval_iters * ramp.global_batch_size if args.eval_interval else 0
    return ramp.samples_after_iterations(train_iters), eval_samples, 0


def loop_config(args, batch: BatchSizes, seq_length: int, train_iters: int) -> LoopConfig:
    return LoopConfig(
        train_iters=train_iters,
        micro_batch=batch.micro,
        seq_length=seq_length,
        log_interval=args.log_interval,
        eval_interval=args.eval_interval,
        eval_iters=args.eval_iters,
        save=args.save,
        save_interval=args.save_interval,
        keep_last=getattr(args, "keep_last", None),
        exit_interval=args.exit_interval,
        progress_bar=not args.no_progress,
        max_consecutive_nonfinite=args.max_consecutive_nonfinite,
    )


def checkpoint_meta(
    args,
    model_cfg: ModelConfig,
    dims: ParallelDims,
    batch: BatchSizes,
    ds_config: dict,
    schedule: LRSchedule,
    train_iters: int | None = None,
) -> dict:
    """The resolved configuration saved in every checkpoint's ``mtnlg_meta.json`` (a ``--load``
    compares it with the new run's: ``mtnlg.training.resume``)."""
    return {
        "model": model_cfg.to_dict(),
        "parallel": {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp},
        "train": {
            "seed": args.seed,
            "micro_batch_size": batch.micro,
            "global_batch_size": batch.final_global,
            "zero_stage": ds_config["zero_optimization"]["stage"],
            "bf16": bool(ds_config.get("bf16", {}).get("enabled")),
            "fp16": bool(ds_config.get("fp16", {}).get("enabled")),
            "lr_schedule": schedule.state_dict(),
            "data_path": args.data_path,
            "split": args.split,
            "train_iters": train_iters,
            "train_samples": getattr(args, "train_samples", None),
            "rampup_batch_size": getattr(args, "rampup_batch_size", None),
        },
    }
