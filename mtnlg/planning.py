"""Capacity planning for a TP x PP x ZeRO-DP layout: parameters, memory, FLOPs, time.

Pure functions and frozen dataclasses, no torch and no processes, so every number is testable.
Conventions (the same as ``mtnlg.model.pipe``):

* Stages are cut like ``PipelineModule(partition_method="type:TransformerBlock")``: DeepSpeed's
  ``partition_balanced`` over the layer specs ``[embed, block x L, final_norm, embed(tied)]``
  with weight 1 per block (ported below so no DeepSpeed import is needed).
* The tied ``GPTEmbedding`` (padded word table, sharded over TP, plus the replicated position
  table) is built on the first AND the last stage; with one stage it is built once.
* Memory formulas: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models" (activations), Rajbhandari et al. 2020 "ZeRO" (model states). FLOPs:
  Narayanan et al. 2021 (Megatron-LM at scale), eq. 3.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mtnlg.config import ModelConfig
from mtnlg.distributed.topology import ParallelConfigError, ParallelDims

GiB = 2**30
PRECISIONS = ("bf16", "fp16", "fp32")


class PlanError(ValueError):
    """A layout the planner refuses; the message names the flags to change."""


@dataclass(frozen=True)
class Layout:
    """The parallel layout and batch shape of one training run."""

    tp: int
    """Tensor-parallel degree (``--tensor-model-parallel-size``)."""
    pp: int
    """Pipeline stages (``--pipeline-model-parallel-size``)."""
    dp: int
    """Data-parallel degree (``--data-parallel-size``, or ``--num-gpus`` / (tp x pp))."""
    micro_batch_size: int
    """Sequences per GPU per micro-batch (``--micro-batch-size``)."""
    global_batch_size: int
    """Sequences per optimizer step over all replicas (``--global-batch-size``)."""
    zero_stage: int = 1
    """ZeRO stage (``--zero-stage``): 1 shards optimizer states, 2 also grads, 3 also weights."""
    precision: str = "bf16"
    """Weight dtype: ``bf16`` / ``fp16`` (mixed precision, fp32 master) or ``fp32``."""
    checkpoint_activations: bool = False
    """Full activation recompute, one checkpoint per block (``--checkpoint-activations``)."""

    def __post_init__(self) -> None:
        if self.dp < 1:
            raise PlanError(f"--data-parallel-size must be >= 1, got {self.dp}")
        ParallelDims(self.world_size, self.tp, self.pp)  # tp, pp >= 1
        if self.zero_stage not in (0, 1, 2, 3):
            raise PlanError(f"--zero-stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise PlanError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.zero_stage >= 2 and self.pp > 1:
            raise PlanError(
                f"--zero-stage {self.zero_stage} with --pipeline-model-parallel-size {self.pp}: "
                "DeepSpeed's pipeline engine supports ZeRO stage 0/1 only"
            )
        if self.micro_batch_size < 1:
            raise PlanError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        per_step = self.micro_batch_size * self.dp
        if self.global_batch_size < 1 or self.global_batch_size % per_step:
            raise PlanError(
                f"--global-batch-size ({self.global_batch_size}) is not divisible by "
                f"--micro-batch-size ({self.micro_batch_size}) x data-parallel size ({self.dp})"
                f" = {per_step}"
            )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per step per pipeline (DeepSpeed's gradient accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)


# --- stages and parameters -------------------------------------------------------------------


def _partition_uniform(num_items: int, num_parts: int) -> list[int]:
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    return [p * chunk + min(p, residual) for p in range(num_parts + 1)]


def partition_balanced(weights: list[int], num_parts: int) -> list[int]:
    """Stage boundaries, a port of ``deepspeed.runtime.utils.partition_balanced`` (same ties)."""
    n, m = len(weights), num_parts
    if n <= m:
        return _partition_uniform(n, m)
    inf = float("inf")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    cost_ = [[inf] * (m + 1) for _ in range(n + 1)]
    pos = [[0] * (m + 1) for _ in range(n + 1)]
    dp_max[0][0] = cost_[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                seg = prefix[i] - prefix[k]
                hi, lo = max(dp_max[k][j - 1], seg), min(dp_min[k][j - 1], seg)
                if cost_[i][j] >= hi - lo:
                    cost_[i][j], dp_max[i][j], dp_min[i][j], pos[i][j] = hi - lo, hi, lo, k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(pos[parts[-1]][j])
    return parts[::-1]


@dataclass(frozen=True)
class StageParams:
    """What one pipeline stage holds."""

    stage: int
    layers: int
    """Transformer blocks on this stage."""
    has_embedding: bool
    """Holds a copy of the tied ``GPTEmbedding`` (first and last stage)."""
    has_final_norm: bool
    params_per_rank: int
    """Parameters on one TP rank: TP shards plus the replicated LayerNorms/biases/positions."""
    params_unique: int
    """Parameters of the whole stage, TP shards merged and replicated tensors counted once."""


def _sharded_replicated(cfg: ModelConfig, tp: int) -> dict[str, tuple[int, int]]:
    """(TP-sharded, TP-replicated) parameter counts of each module kind."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    block_sharded = (3 * h * h + 3 * h) + h * h + (h * f + f) + f * h  # qkv, dense, up, down
    block_replicated = 2 * h + h + 2 * h + h  # ln_1, dense bias, ln_2, down bias
    embed = (cfg.padded_vocab_size(tp) * h, cfg.max_position_embeddings * h)
    return {"block": (block_sharded, block_replicated), "embed": embed, "norm": (0, 2 * h)}


def stage_params(cfg: ModelConfig, tp: int, pp: int) -> list[StageParams]:
    """Per-stage parameter counts with ``type:TransformerBlock`` partitioning."""
    L = cfg.num_layers
    kinds = ["embed"] + ["block"] * L + ["norm", "embed"]
    parts = partition_balanced([int(k == "block") for k in kinds], pp)
    counts = _sharded_replicated(cfg, tp)
    out = []
    for s in range(pp):
        held = kinds[parts[s] : parts[s + 1]]
        if held.count("embed") == 2:  # one stage: DeepSpeed builds a tied key once per stage
            held.remove("embed")
        sharded = sum(counts[k][0] for k in held)
        replicated = sum(counts[k][1] for k in held)
        out.append(
            StageParams(
                stage=s,
                layers=held.count("block"),
                has_embedding="embed" in held,
                has_final_norm="norm" in held,
                params_per_rank=sharded // tp + replicated,
                params_unique=sharded + replicated,
            )
        )
    return out


# --- memory ------------------------------------------------------------------------------------


def activation_bytes_per_layer(s: int, b: int, h: int, a: int, t: int) -> float:
    """Korthikanti et al. 2022 eq. 2 with TP, no sequence parallel: sbh(10 + 24/t + 5as/(ht))."""
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def recompute_bytes_per_layer(s: int, b: int, h: int) -> float:
    """Full recompute keeps only each block's input, (s, b, h) in half precision: 2sbh."""
    return 2 * s * b * h


def grad_bytes_per_param(precision: str, zero_stage: int) -> int:
    """Gradient bytes per parameter before any ZeRO-2/3 division (see ``ASSUMPTIONS``)."""
    if precision == "fp32":
        return 4
    if precision == "bf16" and zero_stage <= 1:
        # bf16 .grad kept between micro-batches (2 B) + accumulation buffer: fp32 (4 B) with
        # ZeRO-1 + data_types.grad_accum_dtype=fp32 (BF16_Optimizer), bf16 (2 B) with ZeRO-0.
        return 6 if zero_stage == 1 else 4
    return 2


ASSUMPTIONS = (
    "weights: 2 B/param bf16/fp16, 4 B fp32; divided by DP only with ZeRO-3",
    "gradients: bf16+ZeRO-1 = 6 B/param (bf16 .grad + fp32 accumulation, DeepSpeed "
    "BF16_Optimizer with data_types.grad_accum_dtype=fp32); bf16+ZeRO-0 = 4 B; fp16 = 2 B; "
    "fp32 = 4 B; divided by DP with ZeRO>=2",
    "optimizer: Adam, 12 B/param mixed precision (fp32 master + m + v), 8 B fp32; "
    "divided by DP with ZeRO>=1",
    "activations: Korthikanti et al. 2022, TP without sequence parallel, with the attention "
    "score term 5as/(ht) (conservative with fused/flash attention); 1F1B keeps "
    "min(PP - stage, micro-batches) micro-batches in flight",
    "recompute: 2sbh per block per micro-batch (block input, not TP-partitioned) + one "
    "block's full working set",
    "last stage: fp32 logits for the loss, b*s*V/t*4 B; not counted: CUDA context, "
    "allocator fragmentation, communication buckets, temporary buffers",
    "time: --tflops is achieved hardware FLOP/s per GPU (pipeline bubble included)",
)


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of one stage."""

    stage: int
    in_flight: int
    """Micro-batches whose activations this stage holds at peak (1F1B)."""
    weights: float
    gradients: float
    optimizer: float
    activations_recompute: float
    activations_no_recompute: float
    logits: float
    checkpoint_activations: bool

    @property
    def activations(self) -> float:
        if self.checkpoint_activations:
            return self.activations_recompute
        return self.activations_no_recompute

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.logits

    @property
    def total_recompute(self) -> float:
        return self.model_states + self.activations_recompute + self.logits

    @property
    def total_no_recompute(self) -> float:
        return self.model_states + self.activations_no_recompute + self.logits


def stage_memory(cfg: ModelConfig, layout: Layout, sp: StageParams) -> StageMemory:
    """Peak memory of one GPU of stage ``sp.stage``."""
    t, d, z = layout.tp, layout.dp, layout.zero_stage
    n = sp.params_per_rank
    weight_b = 4 if layout.precision == "fp32" else 2
    opt_b = 8 if layout.precision == "fp32" else 12
    s, b, h = cfg.seq_length, layout.micro_batch_size, cfg.hidden_size
    in_flight = min(layout.pp - sp.stage, layout.num_micro_batches)
    full = activation_bytes_per_layer(s, b, h, cfg.num_attention_heads, t)
    stored = sp.layers * in_flight
    last = sp.stage == layout.pp - 1
    return StageMemory(
        stage=sp.stage,
        in_flight=in_flight,
        weights=n * weight_b / (d if z >= 3 else 1),
        gradients=n * grad_bytes_per_param(layout.precision, z) / (d if z >= 2 else 1),
        optimizer=n * opt_b / (d if z >= 1 else 1),
        activations_recompute=stored * recompute_bytes_per_layer(s, b, h) + full * (sp.layers > 0),
        activations_no_recompute=stored * full,
        logits=b * s * cfg.padded_vocab_size(t) / t * 4 if last else 0.0,
        checkpoint_activations=layout.checkpoint_activations,
    )


# --- compute -----------------------------------------------------------------------------------


def iteration_flops(
    cfg: ModelConfig, global_batch_size: int, recompute: bool, tp: int = 1
) -> float:
    """Megatron's FLOPs per step: 72 (96 with recompute) Bslh^2 (1 + s/6h + V/12lh)."""
    s, L, h, V = cfg.seq_length, cfg.num_layers, cfg.hidden_size, cfg.padded_vocab_size(tp)
    k = 96 if recompute else 72
    return k * global_batch_size * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))


def bubble_fraction(pp: int, num_micro_batches: int) -> float:
    """1F1B/GPipe idle fraction (p - 1) / (m + p - 1)."""
    return (pp - 1) / (num_micro_batches + pp - 1)


@dataclass(frozen=True)
class Plan:
    """Everything the planner prints; ``to_dict`` is the ``--json`` output."""

    model: ModelConfig
    layout: Layout
    padded_vocab_size: int
    stages: tuple[StageParams, ...]
    memory: tuple[StageMemory, ...]
    flops_per_iteration: float
    seconds_per_iteration: float
    tokens_per_second: float
    train_tokens: float | None
    train_days: float | None
    gpu_memory_gb: float
    tflops: float

    @property
    def busiest(self) -> StageMemory:
        return max(self.memory, key=lambda m: m.total)

    @property
    def fits(self) -> bool:
        return self.busiest.total <= self.gpu_memory_gb * GiB

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.layout.pp, self.layout.num_micro_batches)

    @property
    def kd_cache_bytes(self) -> float | None:
        """Disk for a distillation teacher cache over ``train_tokens`` (``distill.py cache``
        defaults: top-32 logits in fp16 + int32 ids + fp32 log-sum-exp per token)."""
        from mtnlg.distillation.cache import bytes_per_token

        if self.train_tokens is None:
            return None
        return self.train_tokens * bytes_per_token(32, "fp16")

    def to_dict(self) -> dict:
        def mem(m: StageMemory) -> dict:
            d = {k: v for k, v in dataclasses.asdict(m).items() if k != "checkpoint_activations"}
            for k in ("activations", "model_states", "total", "total_recompute"):
                d[k] = getattr(m, k)
            d["total_no_recompute"] = m.total_no_recompute
            return d

        return {
            "model": self.model.to_dict(),
            "layout": dataclasses.asdict(self.layout)
            | {
                "world_size": self.layout.world_size,
                "num_micro_batches": self.layout.num_micro_batches,
            },
            "padded_vocab_size": self.padded_vocab_size,
            "num_parameters": self.model.num_parameters(padded_tp=self.layout.tp),
            "stages": [dataclasses.asdict(s) for s in self.stages],
            "memory_bytes": [mem(m) for m in self.memory],
            "busiest_stage": self.busiest.stage,
            "busiest_total_gib": self.busiest.total / GiB,
            "gpu_memory_gb": self.gpu_memory_gb,
            "fits": self.fits,
            "bubble_fraction": self.bubble,
            "flops_per_iteration": self.flops_per_iteration,
            "tflops_per_gpu": self.tflops,
            "seconds_per_iteration": self.seconds_per_iteration,
            "tokens_per_second": self.tokens_per_second,
            "train_tokens": self.train_tokens,
            "train_days": self.train_days,
            "kd_cache_bytes_top32_fp16": self.kd_cache_bytes,
            "assumptions": list(ASSUMPTIONS),
        }


def make_plan(
    cfg: ModelConfig,
    layout: Layout,
    *,
    gpu_memory_gb: float = 80.0,
    tflops: float = 120.0,
    train_tokens: float | None = None,
) -> Plan:
    """Validate the layout against the model and compute the plan (does not refuse on memory)."""
    padded = cfg.padded_vocab_size(layout.tp)
    dims = ParallelDims(layout.world_size, layout.tp, layout.pp)
    dims.validate_model(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        vocab_size=padded,
    )
    if cfg.ffn_hidden_size % layout.tp:
        raise ParallelConfigError(
            f"ffn hidden size ({cfg.ffn_hidden_size}) is not divisible by "
            f"--tensor-model-parallel-size ({layout.tp})"
        )
    if tflops <= 0 or gpu_memory_gb <= 0:
        raise PlanError("--tflops and --gpu-memory-gb must be > 0")
    stages = stage_params(cfg, layout.tp, layout.pp)
    flops = iteration_flops(cfg, layout.global_batch_size, layout.checkpoint_activations, layout.tp)
    seconds = flops / (layout.world_size * tflops * 1e12)
    tps = layout.global_batch_size * cfg.seq_length / seconds
    return Plan(
        model=cfg,
        layout=layout,
        padded_vocab_size=padded,
        stages=tuple(stages),
        memory=tuple(stage_memory(cfg, layout, sp) for sp in stages),
        flops_per_iteration=flops,
        seconds_per_iteration=seconds,
        tokens_per_second=tps,
        train_tokens=train_tokens,
        train_days=None if train_tokens is None else train_tokens / tps / 86400,
        gpu_memory_gb=gpu_memory_gb,
        tflops=tflops,
    )
