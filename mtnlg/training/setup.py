"""DeepSpeed configuration and engine construction for pretraining and its relatives.

The DeepSpeed JSON stays plain: Python fills only derived fields (micro batch, accumulation,
global batch, precision and optimizer from Megatron flags when the JSON leaves them out) and
refuses contradictions between the JSON and the flags, naming both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtnlg.config import ModelConfig
from mtnlg.distributed.topology import ParallelConfigError, ParallelDims, Topology


class ConfigError(SystemExit):
    """A bad flag or DeepSpeed config: message to the user, non-zero exit, no traceback."""

    def __init__(self, msg: str):
        super().__init__(f"error: {msg}")


@dataclass(frozen=True)
class BatchSizes:
    """Micro batch per rank, the global batch the engine starts with, and the final one."""

    micro: int
    initial_global: int
    final_global: int


def load_ds_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--deepspeed_config {path}: no such file")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: line {e.lineno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--deepspeed_config {path}: not a JSON object")
    return cfg


def check_zero_with_pipeline(args) -> None:
    """ZeRO-2/3 cannot run under DeepSpeed's pipeline engine: refuse before anything starts."""
    stage = args.zero_stage
    if stage is None:
        stage = (
            load_ds_config(getattr(args, "deepspeed_config", None))
            .get("zero_optimization", {})
            .get("stage", 1)
        )
    pp = args.pipeline_model_parallel_size
    if pp > 1 and stage > 1:
        raise ParallelConfigError(
            f"ZeRO stage {stage} with --pipeline-model-parallel-size {pp}: DeepSpeed's "
            "pipeline engine supports ZeRO stage 0/1 only (use PP=1 for ZeRO-2/3)"
        )


def _agree(cfg: dict, key: str, value, flag: str, path: str | None) -> None:
    if key in cfg and cfg[key] is not None and cfg[key] != value:
        raise ConfigError(
            f"{flag} gives {value} but --deepspeed_config {path} sets {key!r}={cfg[key]!r}"
        )
    cfg[key] = value


def resolve_ds_config(args, dims: ParallelDims, batch: BatchSizes) -> dict[str, Any]:
    """The DeepSpeed config: the user's JSON plus derived fields; contradictions refused."""
    from deepspeed.accelerator import get_accelerator

    path = getattr(args, "deepspeed_config", None)
    cfg = load_ds_config(path)
    ramp = getattr(args, "rampup_batch_size", None)
    _agree(cfg, "train_micro_batch_size_per_gpu", batch.micro, "--micro-batch-size", path)
    if ramp is None:
        _agree(cfg, "train_batch_size", batch.initial_global, "--global-batch-size", path)
    else:  # the engine starts at the ramp's first size; the loop grows it
        cfg["train_batch_size"] = batch.initial_global
    gas = batch.initial_global // (batch.micro * dims.dp)
    if ramp is None:
        _agree(cfg, "gradient_accumulation_steps", gas, "--global-batch-size", path)
    else:
        cfg["gradient_accumulation_steps"] = gas

    on_cpu = get_accelerator().device_name() == "cpu"
    fp16_json = bool(cfg.get("fp16", {}).get("enabled", False))
    bf16_json = bool(cfg.get("bf16", {}).get("enabled", False))
    if args.bf16 and fp16_json or args.fp16 and bf16_json or args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 (or the DeepSpeed config's precision) contradict")
    if args.fp16 or fp16_json:
        if on_cpu:
            raise ConfigError("--fp16 needs a GPU (dynamic loss scaling); use --bf16 on the CPU")
        cfg.setdefault("fp16", {}).update({"enabled": True})
        cfg["fp16"].setdefault("loss_scale", 0)  # 0 = dynamic
        cfg["fp16"].setdefault("initial_scale_power", 16)
    if args.bf16 or bf16_json:
        cfg.setdefault("bf16", {}).update({"enabled": True})

    zero = cfg.setdefault("zero_optimization", {})
    if args.zero_stage is not None:
        _agree(zero, "stage", args.zero_stage, "--zero-stage", path)
    zero.setdefault("stage", 1)
    if dims.pp > 1 and zero["stage"] > 1:
        raise ParallelConfigError(
            f"ZeRO stage {zero['stage']} with --pipeline-model-parallel-size {dims.pp}: "
            "DeepSpeed's pipeline engine supports ZeRO stage 0/1 only (use PP=1 for ZeRO-2/3)"
        )
    _resolve_grad_accum_dtype(cfg, path)

    if args.clip_grad is not None:
        _agree(cfg, "gradient_clipping", args.clip_grad, "--clip-grad", path)
    cfg.setdefault("gradient_clipping", 1.0)

    _resolve_optimizer(args, cfg, path, on_cpu)
    cfg.setdefault("steps_per_print", 10**9)  # we log ourselves
    cfg.setdefault("wall_clock_breakdown", False)
    cfg.setdefault(
        "activation_checkpointing",
        {
            # sequence-parallel inputs are per-rank slices already: not partitioned again
            "partition_activations": dims.tp > 1 and not getattr(args, "sequence_parallel", False),
            "contiguous_memory_optimization": False,
            "cpu_checkpointing": False,
        },
    )
    return cfg


FP32_NAMES = ("fp32", "float32", "float", "torch.float32")


def _resolve_grad_accum_dtype(cfg: dict, path: str | None) -> None:
    """bf16 with ZeRO-1 accumulates gradients in fp32 unless the JSON says otherwise.

    DeepSpeed 0.19.8 picks its optimizer wrapper from ``data_types.grad_accum_dtype``: bf16
    weights + ZeRO-1 + fp32 accumulation is ``BF16_Optimizer`` (an fp32 buffer per parameter,
    added to after every micro-batch; plain and pipeline engine alike), while without the key
    gradients are summed in bf16 over all micro-batches (240 in the 530B recipe). With ZeRO-0
    DeepSpeed has no fp32 accumulation (it raises NotImplementedError), so bf16 accumulation
    stays; ZeRO-2/3 keep their own reduction buffers.
    """
    if not cfg.get("bf16", {}).get("enabled"):
        return
    stage = cfg["zero_optimization"]["stage"]
    data_types = cfg.get("data_types", {})
    accum = data_types.get("grad_accum_dtype")
    if stage == 1 and accum is None:
        cfg["data_types"] = {**data_types, "grad_accum_dtype": "fp32"}
    elif stage == 0 and accum is not None and str(accum).lower() in FP32_NAMES:
        raise ConfigError(
            f"--deepspeed_config {path} sets data_types.grad_accum_dtype={accum!r} with bf16 and "
            "ZeRO stage 0: DeepSpeed accumulates bf16 gradients in fp32 only with ZeRO stage 1 "
            "(--zero-stage 1)"
        )


OPTIMIZER_DEFAULTS = {  # flag dest: (DeepSpeed key, default)
    "adam_beta1": ("betas", 0.9),
    "adam_beta2": ("betas", 0.999),
    "adam_eps": ("eps", 1e-8),
    "weight_decay": ("weight_decay", 0.01),
}


def _resolve_optimizer(args, cfg: dict, path: str | None, on_cpu: bool) -> None:
    """Adam(W) hyper-parameters: explicit flag, else the JSON, else Megatron's default.

    Resolved values are written back to ``args`` (the param groups read weight decay there).
    """
    params = cfg.get("optimizer", {}).get("params", {})
    for dest, (key, default) in OPTIMIZER_DEFAULTS.items():
        flag = "--" + dest.replace("_", "-")
        json_val = params.get(key)
        if key == "betas" and json_val is not None:
            json_val = json_val[0 if dest == "adam_beta1" else 1]
        given = getattr(args, dest, None)
        if given is not None and json_val is not None and given != json_val:
            raise ConfigError(f"{flag} gives {given} but --deepspeed_config {path} sets {json_val}")
        setattr(
            args,
            dest,
            given if given is not None else json_val if json_val is not None else default,
        )
    if "optimizer" not in cfg:
        cfg["optimizer"] = {"type": "AdamW", "params": {}}
        if on_cpu:  # FusedAdam would JIT-compile for minutes on the CPU
            cfg["optimizer"]["params"]["torch_adam"] = True
    cfg["optimizer"].setdefault("params", {}).update(
        {
            "lr": args.lr,  # the schedule sets it every step anyway
            "betas": [args.adam_beta1, args.adam_beta2],
            "eps": args.adam_eps,
            "weight_decay": args.weight_decay,
        }
    )


def batch_sizes(args, dims: ParallelDims) -> BatchSizes:
    """Check --global-batch-size / --micro-batch-size / --rampup-batch-size against DP."""
    micro = args.micro_batch_size
    if micro is None or micro < 1:
        raise ConfigError("--micro-batch-size must be >= 1")
    final = args.global_batch_size or micro * dims.dp
    ramp = getattr(args, "rampup_batch_size", None)
    sizes = [final] if ramp is None else [ramp[0], final]
    if ramp is not None:
        start, inc, _ = ramp
        if inc <= 0 or (final - start) % inc:
            raise ConfigError(
                f"--rampup-batch-size: ({final} - {start}) is not a multiple of increment {inc}"
            )
        sizes = list(range(start, final + 1, inc))
    for gb in sizes:
        if gb % (micro * dims.dp):
            flag = "--global-batch-size" if gb == final else "--rampup-batch-size: batch size"
            raise ConfigError(
                f"{flag} {gb} is not divisible by --micro-batch-size ({micro}) x "
                f"data-parallel size ({dims.dp})"
            )
    return BatchSizes(micro=micro, initial_global=sizes[0], final_global=final)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Megatron's grouping: no weight decay on biases and LayerNorm (1-D) parameters.

    A ZeRO-3 partition (built under ``zero3_partitioner``) is an empty 1-D tensor locally: its
    full shape is ``ds_shape``."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if len(getattr(p, "ds_shape", p.shape)) < 2 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def configure_activation_checkpointing(
    topo: Topology, ds_config: dict, sequence_parallel: bool = False
) -> None:
    """DeepSpeed's activation checkpointing, its saved activations partitioned over TP.

    DeepSpeed partitions a checkpointed input it assumes equal on every TP rank; with sequence
    parallelism the inputs are each rank's own slice (already tp times smaller): not partitioned.
    """
    import deepspeed

    from mtnlg.distributed.topology import TensorParallelMPU

    ac = ds_config.get("activation_checkpointing", {})
    partition = ac.get("partition_activations", topo.tp > 1 and not sequence_parallel)
    if sequence_parallel and partition:
        raise ValueError(
            "--sequence-parallel with DeepSpeed's activation_checkpointing.partition_activations: "
            "the checkpointed inputs already are per-rank sequence slices; set it to false"
        )
    deepspeed.checkpointing.configure(
        TensorParallelMPU(topo),
        partition_activations=partition,
        contiguous_checkpointing=ac.get("contiguous_memory_optimization", False),
        checkpoint_in_cpu=ac.get("cpu_checkpointing", False),
    )


def zero3_partitioner(topo: Topology, ds_config: dict):
    """``on_layer`` for :class:`GPTModel` under ZeRO-3: each layer, once built and drawn (fp32,
    exactly as without ZeRO-3), is cast to the engine's dtype and handed to
    ``deepspeed.zero.Init(module=layer)`` over this rank's data-parallel group, which keeps
    1/DP of every parameter and frees the rest before the next layer is built.

    The cast is the one the engine would make (``_cast_module_mixed_precision``) and
    ``zero.Init`` the conversion ZeRO-3 would run on the finished model, layer by layer in the
    same parameter order: the partitions, and so the run, are those of building the whole model
    first. Drawing inside the ``zero.Init`` context instead would draw the fp32 masters in the
    config's dtype (its tensor constructors are patched) and run re-initialisations after a
    submodule is already partitioned (e.g. the position table's), changing the weights.
    """
    import deepspeed

    if ds_config.get("bf16", {}).get("enabled"):
        dtype = torch.bfloat16
    elif ds_config.get("fp16", {}).get("enabled"):
        dtype = torch.half
    else:
        dtype = torch.float32

    def partition(layer: torch.nn.Module) -> None:
        for p in layer.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        deepspeed.zero.Init(
            module=layer,
            data_parallel_group=topo.get_data_parallel_group(),
            config_dict_or_path=ds_config,
            dtype=dtype,
            mpu=topo,
        )

    return partition


def build_gpt(
    cfg: ModelConfig,
    topo: Topology,
    seed: int,
    checkpoint_activations: bool,
    *,
    on_layer=None,
):
    """``GPTPipe`` when PP > 1, else ``GPTModel`` (with DeepSpeed's activation checkpointing);
    ``on_layer`` (PP = 1 only, e.g. :func:`zero3_partitioner`) runs on each layer once built."""
    import deepspeed

    from mtnlg.model import GPTModel
    from mtnlg.model.pipe import GPTPipe

    if topo.pp > 1:
        if on_layer is not None:
            raise ValueError("build_gpt: on_layer is for the plain GPTModel (PP = 1) only")
        return GPTPipe(
            cfg, topo, seed=seed, activation_checkpoint_interval=1 if checkpoint_activations else 0
        )
    model = GPTModel(cfg, tp_group=topo.tp_group, seed=seed, on_layer=on_layer)
    if checkpoint_activations:
        model.checkpoint_fn = deepspeed.checkpointing.checkpoint
    return model


def build_engine(
    cfg: ModelConfig,
    topo: Topology,
    ds_config: dict,
    *,
    seed: int,
    checkpoint_activations: bool,
    weight_decay: float,
    training: bool = True,
    build_model=None,
):
    """The DeepSpeed engine: pipeline engine when PP > 1, else the plain engine (any ZeRO).

    ``build_model(cfg, topo, seed, checkpoint_activations)`` replaces :func:`build_gpt` (e.g.
    a classifier, or weights loaded before DeepSpeed copies them into the optimizer).
    """
    import deepspeed

    from mtnlg.tensor_parallel.random import model_parallel_seed

    if checkpoint_activations:
        configure_activation_checkpointing(topo, ds_config, cfg.sequence_parallel)
    if cfg.sequence_parallel and topo.pp > 1:
        # The pipeline engine would send 1/tp of a tensor it assumes equal on every TP rank and
        # all-gather it on the receiver; sequence-parallel activations differ per rank (and are
        # already tp times smaller): send each rank's own.
        ds_config.setdefault("pipeline", {}).update(pipe_partitioned=False, grad_partitioned=False)
    if (
        build_model is None
        and training
        and ds_config.get("zero_optimization", {}).get("stage") == 3
    ):
        # ZeRO-3 (PP = 1): each layer partitioned over DP as soon as it is built, so no rank
        # ever holds its whole TP shard of the model
        model = build_gpt(
            cfg, topo, seed, checkpoint_activations, on_layer=zero3_partitioner(topo, ds_config)
        )
    else:
        model = (build_model or build_gpt)(cfg, topo, seed, checkpoint_activations)
    kwargs = {} if topo.pp > 1 else {"mpu": topo}
    model_parallel_seed(seed, tp_rank=topo.tp_rank, pp_rank=topo.pp_rank)
    if not training:
        ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
        ds_config["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, weight_decay) if training else None,
        config=ds_config,
        **kwargs,
    )
    return engine
