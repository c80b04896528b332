"""Pretraining driver: flags -> validated configs -> DeepSpeed engine -> loop.

Everything is validated before any heavy work (datasets, model). A ``--load`` checkpoint is
self-describing: its saved model config and tokenizer are used, so no model flags are needed;
flags that contradict what it saved are refused before anything is built (``resume``).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

import torch.distributed as dist

from mtnlg.config import ModelConfig
from mtnlg.distributed.topology import ParallelConfigError, ParallelDims, Topology
from mtnlg.tensor_parallel import skip_init
from mtnlg.training import checkpointing, resume
from mtnlg.training.arguments import (
    add_exit_signal_args,
    add_resume_args,
    apply_kernel_flags,
    build_parser,
    model_config_from_args,
)
from mtnlg.training.data import build_datasets, check_data_path
from mtnlg.training.loop import Progress, train
from mtnlg.training.metrics import MetricsLogger
from mtnlg.training.runconfig import checkpoint_meta, dataset_samples, loop_config, schedules
from mtnlg.training.setup import (
    batch_sizes,
    build_engine,
    check_zero_with_pipeline,
    resolve_ds_config,
)
from mtnlg.training.signals import ExitSignalHandler, training_session


def _user_error(e: Exception) -> SystemExit:
    return SystemExit(f"error: {e}")


def resolve_model_and_tokenizer(args) -> tuple[ModelConfig, object, dict | None]:
    """From a checkpoint's metadata when resuming, else from the flags."""
    from mtnlg.data.tokenizer import build_tokenizer, load_tokenizer

    if resume.checkpoint_in(args, _rank()):
        meta = checkpointing.read_meta(args.load)
        tag = meta["tag"]
        cfg = resume.resumed_config(ModelConfig.from_dict(meta["model"]), args)
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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def check_resume(args, saved: dict | None, meta: dict, schedule) -> resume.Policy:
    """The flags against the checkpoint's saved settings (``resume``): SystemExit naming both
    values of each unsettled difference; the checkpoint's LR schedule restored into
    ``schedule`` with ``--use-checkpoint-opt_param-scheduler``."""
    if saved is None:
        return resume.Policy.from_args(args)
    given = resume.given_model_flags(args, saved["model"])
    if args.vocab_file or args.tokenizer_model:  # the tokenizer is the checkpoint's
        from mtnlg.data.tokenizer import build_tokenizer

        try:
            tok = build_tokenizer(
                args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model
            )
        except (FileNotFoundError, OSError) as e:
            raise ValueError(e) from None
        given["vocab_size"] = ("--vocab-file/--tokenizer-model (vocabulary size)", tok.vocab_size)
    return resume.enforce(args, saved, meta, given, schedule, _rank())


def apply_sequence_parallel(args, cfg: ModelConfig) -> None:
    """``--sequence-parallel`` onto the (runtime-only) config field, refusing what it breaks."""
    if not getattr(args, "sequence_parallel", False):
        return
    tp = args.tensor_model_parallel_size
    if cfg.seq_length % tp:
        raise ValueError(
            f"--sequence-parallel: --seq-length ({cfg.seq_length}) is not divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    if getattr(args, "eval_tasks", None):
        raise ValueError(
            "--eval-tasks runs the model's layers outside the engine and does not support "
            "--sequence-parallel; run evaluate.py on the checkpoint instead"
        )
    cfg.sequence_parallel = tp > 1


def check_peak_tflops(args) -> None:
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ValueError(f"--peak-tflops {args.peak_tflops}: must be > 0 (the device's peak)")


def build_pretrain_parser(description: str = __doc__, eval_tasks=None) -> argparse.ArgumentParser:
    """pretrain.py's parser: the training flags, sequence parallelism, preemption, resume, and
    ``eval_tasks.add_args`` (the entry's evaluation tasks, if it wires any)."""
    parser = build_parser(description, sequence_parallel=True)
    add_exit_signal_args(parser)
    add_resume_args(parser)
    if eval_tasks is not None:
        eval_tasks.add_args(parser)
    return parser


def run(argv: list[str] | None = None, description: str = __doc__, eval_tasks=None) -> Progress:
    """Pretrain with ``argv``. ``eval_tasks``: what the entry wires into the loop (an object
    with ``add_args(parser)`` and ``prepare(args, tokenizer, seq_length)`` returning a
    ``(engine, topo) -> log fields`` hook or None; ``mtnlg/pretrain.py`` passes
    ``mtnlg.evaluation.tasks.TRAINING_TASKS``), so training never imports evaluation."""
    parser = build_pretrain_parser(description, eval_tasks)
    args = parser.parse_args(argv)
    apply_kernel_flags(args)
    with training_session(args) as exit_signal:
        return _run(args, exit_signal, eval_tasks)


def _run(
    args: argparse.Namespace, exit_signal: ExitSignalHandler | None = None, eval_tasks=None
) -> Progress:
    try:
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        model_cfg, tokenizer, saved = resolve_model_and_tokenizer(args)
        apply_sequence_parallel(args, model_cfg)
        # the model against TP/PP first (needs no world), then the world itself
        ParallelDims(world_size=tp * pp, tp=tp, pp=pp).validate_config(model_cfg)
        check_zero_with_pipeline(args)
        check_peak_tflops(args)
        dims = ParallelDims(world_size=dist.get_world_size(), tp=tp, pp=pp)
        batch = batch_sizes(args, dims)
        ramp, train_iters, schedule = schedules(args, batch, dims)
        ds_config = resolve_ds_config(args, dims, batch)
        meta = checkpoint_meta(args, model_cfg, dims, batch, ds_config, schedule, train_iters)
        policy = check_resume(args, saved, meta, schedule)
        check_data_path(args.data_path)
        task_hook = (
            eval_tasks.prepare(args, tokenizer, model_cfg.seq_length) if eval_tasks else None
        )
    except (ParallelConfigError, ValueError) as e:
        raise _user_error(e) from None

    seq = model_cfg.seq_length
    try:
        datasets = build_datasets(args, seq, dataset_samples(args, ramp, train_iters), args.seed)
    except ValueError as e:  # DataError: names the file
        raise _user_error(e) from None
    topo = Topology(dims)
    # resuming: the checkpoint's weights and optimizer state follow, nothing is drawn
    with skip_init() if saved is not None else nullcontext():
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
        p = checkpointing.load(
            engine,
            topo,
            args.load,
            load_optimizer=policy.load_optimizer,
            load_rng=policy.load_rng,
            verify_hash=not args.no_verify_checkpoint_hash,
        )["progress"]
        if not policy.finetune:  # --finetune: a new run from the weights
            progress = Progress(p["iteration"], p["consumed_samples"], p["consumed_tokens"])
        if topo.rank == 0:
            print(resume.loaded_message(args.load, p, policy), flush=True)
    loop = loop_config(args, batch, seq, train_iters)
    logger = MetricsLogger.from_args(args, enabled=topo.rank == 0)
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
            peak_tflops=args.peak_tflops,
            eval_tasks=task_hook,
            exit_signal=exit_signal,
        )
    finally:
        logger.close()
