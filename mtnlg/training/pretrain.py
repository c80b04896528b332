"""Pretraining driver: flags -> validated configs -> DeepSpeed engine -> loop.

Everything is validated before any heavy work (datasets, model). A ``--load`` checkpoint is
self-describing: its saved model config and tokenizer are used, so no model flags are needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from mtnlg.config import ModelConfig
from mtnlg.distributed.init import init_distributed, shutdown
from mtnlg.distributed.topology import ParallelConfigError, ParallelDims, Topology
from mtnlg.training import checkpointing
from mtnlg.training.arguments import build_parser, model_config_from_args
from mtnlg.training.data import build_datasets, check_data_path
from mtnlg.training.loop import LoopConfig, Progress, train
from mtnlg.training.metrics import MetricsLogger
from mtnlg.training.schedules import BatchRampup, LRSchedule
from mtnlg.training.setup import (
    batch_sizes,
    build_engine,
    check_zero_with_pipeline,
    resolve_ds_config,
)


def _user_error(e: Exception) -> SystemExit:
    return SystemExit(f"error: {e}")


def resolve_model_and_tokenizer(args) -> tuple[ModelConfig, object, dict | None]:
    """From a checkpoint's metadata when resuming, else from the flags."""
    from mtnlg.data.tokenizer import build_tokenizer, load_tokenizer

    if args.load and (Path(args.load) / "latest").is_file():
        meta = checkpointing.read_meta(args.load)
        tag = meta["tag"]
        cfg = ModelConfig.from_dict(meta["model"])
        tok_dir = Path(args.load) / tag / "tokenizer"
        tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
        return cfg, tokenizer, meta
    try:
        tokenizer = build_tokenizer(
            args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        raise _user_error(e) from None
    try:
        return model_config_from_args(args, tokenizer.vocab_size), tokenizer, None
    except ValueError as e:
        raise _user_error(e) from None


def run(argv: list[str] | None = None, description: str = __doc__) -> Progress:
    args = build_parser(description).parse_args(argv)
    init_distributed()
    try:
        return _run(args)
    finally:
        shutdown()


def _run(args: argparse.Namespace) -> Progress:
    try:
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        model_cfg, tokenizer, saved = resolve_model_and_tokenizer(args)
        # the model against TP/PP first (needs no world), then the world itself
        ParallelDims(world_size=tp * pp, tp=tp, pp=pp).validate_model(
            num_layers=model_cfg.num_layers,
            hidden_size=model_cfg.hidden_size,
            num_attention_heads=model_cfg.num_attention_heads,
            vocab_size=model_cfg.padded_vocab_size(tp),
        )
        check_zero_with_pipeline(args)
        dims = ParallelDims(world_size=dist.get_world_size(), tp=tp, pp=pp)
        dims.validate_model(
            num_layers=model_cfg.num_layers,
            hidden_size=model_cfg.hidden_size,
            num_attention_heads=model_cfg.num_attention_heads,
            vocab_size=model_cfg.padded_vocab_size(dims.tp),
        )
        batch = batch_sizes(args, dims)
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
        ds_config = resolve_ds_config(args, dims, batch)
        check_data_path(args.data_path)
    except (ParallelConfigError, ValueError) as e:
        raise _user_error(e) from None

    seq = model_cfg.seq_length
    eval_samples = args.eval_iters * batch.final_global if args.eval_interval else 0
    try:
        datasets = build_datasets(
            args, seq, (ramp.samples_after_iterations(train_iters), eval_samples, 0), args.seed
        )
    except ValueError as e:  # DataError: names the file
        raise _user_error(e) from None
    topo = Topology(dims)
    engine = build_engine(
        model_cfg,
        topo,
        ds_config,
        seed=args.seed,
        checkpoint_activations=args.checkpoint_activations,
        weight_decay=args.weight_decay,
    )
    progress = Progress()
    if saved is not None:
        meta = checkpointing.load(engine, topo, args.load)
        p = meta["progress"]
        progress = Progress(p["iteration"], p["consumed_samples"], p["consumed_tokens"])
        if topo.rank == 0:
            print(
                f"resumed from {args.load} at iteration {progress.iteration} "
                f"({progress.consumed_samples} samples)",
                flush=True,
            )
    meta = {
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
        },
    }
    loop = LoopConfig(
        train_iters=train_iters,
        micro_batch=batch.micro,
        seq_length=seq,
        log_interval=args.log_interval,
        eval_interval=args.eval_interval,
        eval_iters=args.eval_iters,
        save=args.save,
        save_interval=args.save_interval,
        exit_interval=args.exit_interval,
        progress_bar=not args.no_progress,
    )
    logger = MetricsLogger(args.metrics_file, args.tensorboard_dir, enabled=topo.rank == 0)
    try:
        return train(
            engine,
            topo,
            model_cfg,
            datasets,
            loop,
            schedule,
            ramp,
            progress,
            meta,
            tokenizer=tokenizer,
            logger=logger,
        )
    finally:
        logger.close()
