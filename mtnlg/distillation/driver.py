"""Distillation driver: flags -> teacher (frozen, TP-sharded) + student -> DeepSpeed -> loop.

The student trains with the pretraining machinery unchanged (``mtnlg.training``: data,
ramp-up, LR schedule, ZeRO 0-3, TP, DP, metrics, checkpoints with exact resume); only the
model's training forward differs (``DistillStudent``). Online, the teacher runs beside the
student on DeepSpeed's plain engine (PP = 1). With ``--teacher-cache`` the teacher's top-k comes
from disk (``cache_student``) and the student may use any TP x PP x DP.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from mtnlg.distillation.cache import CacheError
from mtnlg.distillation.cache_student import (
    CachedSamples,
    build_cache_student_engine,
    cache_train_samples,
    check_cache,
    open_cache,
    topk_mass,
)
from mtnlg.distillation.student import DistillStudent, KDConfig
from mtnlg.distillation.student_init import (
    STUDENT_SHAPE,
    check_same_vocab,
    init_from_teacher_layers,
    load_student_weights,
    parse_init_layers,
    student_config,
    student_load_config,
)
from mtnlg.distillation.teacher import Teacher, load_teacher
from mtnlg.distributed.init import current_device
from mtnlg.distributed.topology import ParallelConfigError, ParallelDims, Topology
from mtnlg.presets import preset_names
from mtnlg.training import checkpointing, resume
from mtnlg.training.arguments import (
    add_exit_signal_args,
    add_resume_args,
    apply_kernel_flags,
    build_parser,
)
from mtnlg.training.data import build_datasets, check_data_path
from mtnlg.training.loop import Progress, train
from mtnlg.training.metrics import MetricsLogger
from mtnlg.training.pretrain import check_peak_tflops
from mtnlg.training.runconfig import checkpoint_meta, dataset_samples, loop_config, schedules
from mtnlg.training.setup import (
    batch_sizes,
    check_zero_with_pipeline,
    configure_activation_checkpointing,
    param_groups,
    resolve_ds_config,
)
from mtnlg.training.signals import training_session


def add_distill_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("distillation (model flags such as --seq-length apply to the student)")
    g.add_argument("--teacher", help="online: mtnlg checkpoint dir or Hugging Face folder")
    g.add_argument(
        "--teacher-cache",
        help="a teacher cache written by `distill.py cache` (instead of --teacher; any PP)",
    )
    g.add_argument("--student-preset", choices=preset_names(), help="named student size")
    g.add_argument("--student-num-layers", type=int, help="default: the teacher's")
    g.add_argument("--student-hidden-size", type=int, help="default: the teacher's")
    g.add_argument("--student-num-attention-heads", type=int, help="default: the teacher's")
    g.add_argument("--student-ffn-hidden-size", type=int, help="default: 4 x hidden size")
    g.add_argument(
        "--student-load",
        help="start the student from this mtnlg checkpoint's shape and weights (any TP x PP), "
        "e.g. prune.py's output; the optimizer starts anew",
    )
    g.add_argument("--student-init", default="random", choices=["random", "teacher-layers"])
    g.add_argument(
        "--student-init-layers",
        help="teacher blocks copied into the student, e.g. 0,2,4 (default: evenly spaced)",
    )
    g.add_argument("--kd-temperature", type=float, default=1.0, help="T (loss scaled by T²)")
    g.add_argument("--kd-alpha", type=float, default=0.5, help="alpha*KL + (1-alpha)*CE")
    g.add_argument("--kd-loss", default="forward-kl", choices=["forward-kl", "reverse-kl"])
    g.add_argument(
        "--cache-kd-loss",
        default="topk-rest",
        choices=["topk-rest", "topk-renorm"],
        help="with --teacher-cache: KL over the top-k + a rest bucket, or renormalised on the "
        "top-k; a cache with sampled ids (--sampled-k) uses its unbiased estimator (refuses "
        "topk-renorm)",
    )
    g.add_argument("--export-hf", help="after training, write the student as a HF folder here")
    return p


def build_distill_parser(description: str) -> argparse.ArgumentParser:
    p = build_parser(description)
    add_exit_signal_args(p)
    add_resume_args(p)
    return add_distill_args(p)


def run(argv: list[str] | None = None, description: str = __doc__) -> Progress:
    args = build_distill_parser(description).parse_args(argv)
    apply_kernel_flags(args)
    with training_session(args) as exit_signal:
        return _run(args, exit_signal)


def _check_flags(args) -> None:
    if bool(args.teacher) == bool(args.teacher_cache):
        raise ValueError("give one of --teacher (online) and --teacher-cache (a cached teacher)")
    pp = args.pipeline_model_parallel_size
    if pp != 1 and not args.teacher_cache:
        raise ParallelConfigError(
            f"--pipeline-model-parallel-size {pp}: online distillation runs the student on "
            "DeepSpeed's plain engine (PP=1); for a pipeline-parallel student write a teacher "
            "cache first (`distill.py cache ...`) and train with --teacher-cache DIR"
        )
    if args.teacher_cache and args.student_init == "teacher-layers":
        raise ValueError("--student-init teacher-layers needs the teacher's weights (--teacher)")
    if pp != 1 and args.export_hf:
        raise ValueError(
            "--export-hf needs PP=1: convert the saved student with "
            "checkpoint_tools/convert_checkpoint.py"
        )
    if args.student_load:
        given = [f for f in ("preset", *STUDENT_SHAPE) if getattr(args, "student_" + f, None)]
        if args.student_init != "random" or given:
            flags = [f"--student-{f.replace('_', '-')}" for f in given] or ["--student-init"]
            raise ValueError(f"--student-load brings the student's shape and weights: drop "
                             f"{', '.join(flags)}")  # fmt: skip
    for flag in ("preset", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        if getattr(args, flag, None) is not None:
            name = flag.replace("_", "-")
            raise ValueError(f"--{name} is ambiguous in distillation: use --student-{name}")


def _check_resume(args, dims, batch, ds_config, schedule, train_iters):
    """(resuming?, policy): a ``--load`` of the student's own checkpoint is checked against the
    flags (``mtnlg.training.resume``) before the teacher loads, the student's model flags given
    explicitly (``--student-*`` shape, the ordinary architecture flags) included."""
    from mtnlg.config import ModelConfig

    policy = resume.Policy.from_args(args)
    if not resume.checkpoint_in(args, dist.get_rank()):
        return False, policy
    saved = checkpointing.read_meta(args.load)
    cfg = resume.resumed_config(ModelConfig.from_dict(saved["model"]), args)
    now = checkpoint_meta(args, cfg, dims, batch, ds_config, schedule, train_iters)
    given = resume.given_model_flags(args, saved["model"])
    for k in STUDENT_SHAPE:
        if getattr(args, "student_" + k, None) is not None:
            given[k] = (f"--student-{k.replace('_', '-')}", getattr(args, "student_" + k))
    return True, resume.enforce(args, saved, now, given, schedule, dist.get_rank())


def _tokenizer(args, teacher):
    return resolve_tokenizer(args, teacher.tokenizer)


def resolve_tokenizer(args, teacher_tokenizer):
    """The tokenizer the flags name (--vocab-file ...), else the teacher's own."""
    from mtnlg.data.tokenizer import build_tokenizer

    if args.vocab_file or args.tokenizer_model:
        return build_tokenizer(
            args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model
        )
    if teacher_tokenizer is None:
        raise ValueError("the teacher ships no tokenizer: give --vocab-file/--merge-file")
    return teacher_tokenizer


def _dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def _run(args: argparse.Namespace, exit_signal=None) -> Progress:
    from mtnlg.config import ModelConfig

    try:
        _check_flags(args)
        check_peak_tflops(args)
        kd = KDConfig(args.kd_temperature, args.kd_alpha, args.kd_loss)
        check_zero_with_pipeline(args)
        dims = ParallelDims(
            world_size=dist.get_world_size(),
            tp=args.tensor_model_parallel_size,
            pp=args.pipeline_model_parallel_size,
        )
        batch = batch_sizes(args, dims)
        ramp, train_iters, schedule = schedules(args, batch, dims)
        ds_config = resolve_ds_config(args, dims, batch)
        check_data_path(args.data_path)
        resumed, policy = _check_resume(args, dims, batch, ds_config, schedule, train_iters)
    except (ParallelConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

    topo = Topology(dims)
    dtype = _dtype(ds_config)
    cache = None
    if args.teacher_cache:
        from mtnlg.distillation.cache_student import cache_loss, describe

        try:
            cache, cache_tok = open_cache(args.teacher_cache, kd.temperature)
            cache_kd_loss = cache_loss(cache, kd, args.cache_kd_loss)
        except CacheError as e:
            raise SystemExit(f"error: {e}") from None
        teacher = Teacher(ModelConfig.from_dict(cache.spec.teacher["model"]), None, cache_tok)
        if topo.rank == 0:
            print(
                f"teacher cache {args.teacher_cache}: {cache.spec.num_samples} samples, "
                f"{describe(cache)}, the top-k holding {topk_mass(cache):.1%} of the teacher's "
                f"probability at T = {kd.temperature:g} on average; loss {cache_kd_loss}",
                flush=True,
            )
    else:
        teacher = load_teacher(args.teacher, topo.tp_group, topo.tp, topo.tp_rank, current_device())
        teacher.model.to(dtype)
    try:
        if resumed:  # the student's shape and tokenizer come from its own checkpoint
            from mtnlg.data.tokenizer import load_tokenizer

            saved = checkpointing.read_meta(args.load)
            model_cfg = resume.resumed_config(ModelConfig.from_dict(saved["model"]), args)
            tok_dir = Path(args.load) / saved["tag"] / "tokenizer"
            tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() else _tokenizer(args, teacher)
        elif args.student_load:
            tokenizer = _tokenizer(args, teacher)
            model_cfg = student_load_config(args.student_load, args)
        else:
            tokenizer = _tokenizer(args, teacher)
            model_cfg = student_config(args, teacher.cfg)
        check_same_vocab(model_cfg, teacher.cfg, tokenizer)
        dims.validate_config(model_cfg)
        init_layers = None
        if args.student_init == "teacher-layers" and not resumed:
            init_layers = parse_init_layers(
                args.student_init_layers, model_cfg.num_layers, teacher.cfg.num_layers
            )
    except (ParallelConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

    samples = dataset_samples(args, ramp, train_iters)
    try:
        if cache is not None:
            samples = (cache_train_samples(cache, samples[0]), *samples[1:])
            check_cache(cache, args, model_cfg.seq_length, tokenizer, samples[0])
        datasets = build_datasets(args, model_cfg.seq_length, samples, args.seed)
    except ValueError as e:  # CacheError and DataError included: they name the flag or file
        raise SystemExit(f"error: {e}") from None

    if cache is not None:
        datasets = (CachedSamples(datasets[0], cache), *datasets[1:])
        engine = build_cache_student_engine(
            model_cfg, topo, ds_config, kd, args, cache_kd_loss,
            load=None if resumed else args.student_load, sampled_k=cache.spec.sampled_k,
        )  # fmt: skip
    else:
        engine = build_student_engine(
            model_cfg, topo, ds_config, kd, teacher.model, init_layers, args=args,
            load=None if resumed else args.student_load,
        )  # fmt: skip
    progress = Progress()
    if resumed:
        p = checkpointing.load(
            engine, topo, args.load, load_optimizer=policy.load_optimizer,
            load_rng=policy.load_rng, verify_hash=not args.no_verify_checkpoint_hash,
        )["progress"]  # fmt: skip
        if not policy.finetune:
            progress = Progress(p["iteration"], p["consumed_samples"], p["consumed_tokens"])
        if topo.rank == 0:
            print(resume.loaded_message(args.load, p, policy), flush=True)
    meta = checkpoint_meta(args, model_cfg, dims, batch, ds_config, schedule, train_iters)
    meta["distill"] = {
        "teacher": str(args.teacher or cache.spec.teacher["path"]),
        "teacher_cache": args.teacher_cache,
        "top_k": None if cache is None else cache.spec.top_k,
        "sampled_k": None if cache is None else cache.spec.sampled_k,
        "teacher_model": teacher.cfg.to_dict(),
        "kd_temperature": kd.temperature,
        "kd_alpha": kd.alpha,
        "kd_loss": kd.mode,
        "cache_kd_loss": None if cache is None else cache_kd_loss,
        "student_init": "load" if args.student_load else args.student_init,
        "student_load": args.student_load,
        "student_init_layers": init_layers,
    }
    loop = loop_config(args, batch, model_cfg.seq_length, train_iters)
    logger = MetricsLogger.from_args(args, enabled=topo.rank == 0)
    try:
        progress = train(
            engine, topo, model_cfg, datasets, loop, schedule, ramp, progress, meta,
            tokenizer=tokenizer, logger=logger, peak_tflops=args.peak_tflops,
            exit_signal=exit_signal,
        )  # fmt: skip
    finally:
        logger.close()
    if args.export_hf and progress.iteration >= train_iters:
        export_student(engine, topo, model_cfg, tokenizer, args.export_hf)
    return progress


def build_student_engine(cfg, topo, ds_config, kd, teacher, init_layers, *, args, load=None):
    """``setup.build_engine`` for PP=1 with the distillation student (teacher attached);
    ``load``: a checkpoint whose weights start the student (``--student-load``)."""
    import deepspeed

    from mtnlg.tensor_parallel.random import model_parallel_seed

    if args.checkpoint_activations:
        configure_activation_checkpointing(topo, ds_config)
    model = DistillStudent(cfg, tp_group=topo.tp_group, seed=args.seed, kd=kd)
    if init_layers is not None:
        init_from_teacher_layers(model, teacher, init_layers)
    if load is not None:
        load_student_weights(model, load, cfg, topo)
    model.attach_teacher(teacher)
    if args.checkpoint_activations:
        model.checkpoint_fn = deepspeed.checkpointing.checkpoint
    model_parallel_seed(args.seed, tp_rank=topo.tp_rank, pp_rank=0)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, args.weight_decay),
        config=ds_config,
        mpu=topo,
    )
    return engine


def gather_student_state(engine, topo, cfg) -> dict[str, torch.Tensor]:
    """The student's full TP=1 fp32 state on every rank (ZeRO-3 parameters gathered first)."""
    import contextlib

    import deepspeed

    from mtnlg.checkpoint import merge_state

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    params = list(module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params) if zero3 else contextlib.nullcontext()
    with ctx:
        local = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    shards: list = [None] * topo.tp
    if topo.tp > 1:
        dist.all_gather_object(shards, local, group=topo.tp_group)
    else:
        shards = [local]
    return merge_state(shards, cfg)


def export_student(engine, topo, cfg, tokenizer, out_dir: str) -> None:
    """Write the student as a Hugging Face folder through the converter (rank 0): GPT-2, or the
    Llama family the converter maps the student's architecture to."""
    from mtnlg.checkpoint import export_hf

    full = gather_student_state(engine, topo, cfg)
    if topo.rank == 0:
        export_hf(cfg, full, tokenizer, out_dir)
        print(f"exported the student to {out_dir} (Hugging Face)", flush=True)
    dist.barrier()
