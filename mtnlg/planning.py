"""Capacity planning for a TP x PP x ZeRO-DP layout: parameters, memory, FLOPs, time.

Pure functions and frozen dataclasses, no torch and no processes, so every number is testable.
Conventions (the same as ``mtnlg.model.pipe``):

* Stages are cut like ``PipelineModule(partition_method="type:TransformerBlock")``: DeepSpeed's
  ``partition_balanced`` over the layer specs ``[embed, block x L, final_norm, embed(tied)]``
  with weight 1 per block (ported below so no DeepSpeed import is needed).
* The tied ``GPTEmbedding`` (padded word table, sharded over TP, plus the replicated position
  table) is built on the first stage, its word table alone (what the tied head uses) again on
  the last; with one stage the embedding is built once. Untied
  (``--untie-embeddings-and-output-weights``): the embedding on the first stage only and a
  separate vocab-parallel ``OutputLayer`` (V x h, no bias) on the last.
* Llama-style options change the counts as the model builds them: RoPE has no position table,
  RMSNorm no bias, SwiGLU a fused (2f, h) gate|up matrix, GQA K/V projections of
  ``num_query_groups * head_dim`` rows (every element on exactly one TP rank, also when the KV
  groups are fewer than the TP ranks), ``--disable-bias-linear`` no linear biases.
* Memory formulas: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models" (activations), Rajbhandari et al. 2020 "ZeRO" (model states). FLOPs:
  Narayanan et al. 2021 (Megatron-LM at scale), eq. 3.
"""

from __future__ import annotations

import dataclasses
import functools
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
    sequence_parallel: bool = False
    """Megatron sequence parallelism (``--sequence-parallel``): norm/dropout regions sharded."""

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
    return list(_partition_balanced(tuple(weights), num_parts))


@functools.lru_cache(maxsize=256)  # O(n^2 p): --search asks for the same cut many times
def _partition_balanced(weights: tuple[int, ...], num_parts: int) -> tuple[int, ...]:
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
    return tuple(parts[::-1])


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
    has_output_layer: bool = False
    """Holds the untied ``OutputLayer`` (last stage, ``--untie-embeddings-and-output-weights``)."""


def qkv_rows(cfg: ModelConfig) -> int:
    """Output rows of the fused QKV projection: (heads + 2 KV groups) x head_dim."""
    return (cfg.num_attention_heads + 2 * cfg.kv_groups) * cfg.head_dim


def mlp_up_rows(cfg: ModelConfig) -> int:
    """Output rows of the MLP's first (column-parallel) matrix: 2f with SwiGLU (gate|up), else f."""
    return 2 * cfg.ffn_hidden_size if cfg.swiglu else cfg.ffn_hidden_size


def _sharded_replicated(cfg: ModelConfig, tp: int) -> dict[str, tuple[int, int]]:
    """(TP-sharded, TP-replicated) parameter counts of each module kind."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    qkv, up, bias = qkv_rows(cfg), mlp_up_rows(cfg), int(cfg.add_bias_linear)
    norm = h if cfg.normalization == "rmsnorm" else 2 * h  # weight (+ bias)
    # column-parallel qkv (+ bias) and up (+ bias), row-parallel dense and down (weights only)
    block_sharded = qkv * (h + int(cfg.qkv_bias)) + cfg.attention_dim * h + up * (h + bias) + f * h
    block_replicated = 2 * norm + 2 * h * bias  # ln_1, ln_2; dense and down biases
    positions = 0 if cfg.use_rope else cfg.max_position_embeddings * h
    vocab = cfg.padded_vocab_size(tp) * h
    return {
        "block": (block_sharded, block_replicated),
        "embed": (vocab, positions),
        "head": (vocab, 0),  # the tied embedding's word table on the last stage
        "norm": (0, norm),
        "output": (vocab, 0),
    }


def stage_params(cfg: ModelConfig, tp: int, pp: int) -> list[StageParams]:
    """Per-stage parameter counts with ``type:TransformerBlock`` partitioning."""
    L = cfg.num_layers
    kinds = ["embed"] + ["block"] * L + ["norm", "head" if cfg.tied else "output"]
    parts = partition_balanced([int(k == "block") for k in kinds], pp)
    counts = _sharded_replicated(cfg, tp)
    out = []
    for s in range(pp):
        held = kinds[parts[s] : parts[s + 1]]
        if "embed" in held and "head" in held:  # one stage: a tied key is built once per stage
            held.remove("head")
        sharded = sum(counts[k][0] for k in held)
        replicated = sum(counts[k][1] for k in held)
        out.append(
            StageParams(
                stage=s,
                layers=held.count("block"),
                has_embedding="embed" in held or "head" in held,
                has_final_norm="norm" in held,
                params_per_rank=sharded // tp + replicated,
                params_unique=sharded + replicated,
                has_output_layer="output" in held,
            )
        )
    return out


# --- memory ------------------------------------------------------------------------------------


def activation_bytes_per_layer(
    s: int,
    b: int,
    h: int,
    a: int,
    t: int,
    *,
    kv_dim: int | None = None,
    ffn: int | None = None,
    swiglu: bool = False,
    sequence_parallel: bool = False,
    value_bytes: int = 2,
    mask_bytes: int = 1,
) -> float:
    """Korthikanti et al. 2022 eq. 2 with TP, no sequence parallel: sbh(10 + 24/t + 5as/(ht));
    with sequence parallel (their eq. 4) the replicated 10sbh is split too: sbh/t (34 + 5as/h).

    Generalised term by term, in stored values (``value_bytes`` each, 2 in half precision)
    and dropout masks (``mask_bytes`` each: 1 for CUDA's bool masks; the CPU's dropout keeps
    the scaled noise in the input's dtype). Replicated (split over TP with sequence
    parallelism): the two norm inputs, the QKV and MLP inputs (4sbh values) and the two
    residual-dropout masks (2sbh masks). Per TP rank: Q (sbh), K and V (sb x kv_dim each; GQA:
    ``num_query_groups * head_dim``, default h), the dense input (sbh), the MLP's inner
    activations (GeLU: input and output 2sbf; SwiGLU as autograd keeps them: gate|up, silu(gate),
    product 4sbf; default f = 4h), and the scores: softmax output and dropout output (2as^2b
    values) and the attention-dropout mask (as^2b masks). The norms' fp32 statistics (8sb
    bytes per norm) are not counted. ``tests/distributed/test_activation_memory.py`` measures
    our GPT block (LayerNorm, GeLU, learned positions, dropout on) against this: equal to the
    byte, with and without sequence parallelism.

    Not modelled (measured on the CPU at TP2, h 64, fp32, against this formula): our RMSNorm
    also keeps an fp32 copy of its input (+4 B per element per norm; +13 % without, +8 % with
    sequence parallelism); RoPE keeps the rotated halves (+2 %); with fewer KV groups than
    heads the CPU's SDPA expands K and V to every head before saving them (+3 to 4 %). The
    scores (5as^2b) are what unfused attention keeps; flash attention keeps none of them.
    """
    kv = h if kv_dim is None else kv_dim
    f = 4 * h if ffn is None else ffn
    per_rank = 2 * s * b * h + 2 * s * b * kv + (4 if swiglu else 2) * s * b * f
    replicated = (4 * value_bytes + 2 * mask_bytes) * s * b * h / (t if sequence_parallel else 1)
    scores = (2 * value_bytes + mask_bytes) * a * s * s * b
    return replicated + (value_bytes * per_rank + scores) / t


def model_activation_bytes_per_layer(
    cfg: ModelConfig, b: int, t: int, sequence_parallel: bool = False
) -> float:
    """``activation_bytes_per_layer`` at the shape of ``cfg``. With fewer KV groups than TP
    ranks each rank all-gathers its group's whole K/V (head_dim rows each): counted as
    kv_dim = max(groups, t) x head_dim, so kv_dim / t is what one rank stores."""
    return activation_bytes_per_layer(
        cfg.seq_length,
        b,
        cfg.hidden_size,
        cfg.num_attention_heads,
        t,
        kv_dim=max(cfg.kv_groups, t) * cfg.head_dim,
        ffn=cfg.ffn_hidden_size,
        swiglu=cfg.swiglu,
        sequence_parallel=sequence_parallel,
    )


def recompute_bytes_per_layer(s: int, b: int, h: int, t: int = 1) -> float:
    """Full recompute keeps only each block's input, (s, b, h) in half precision: 2sbh; with
    sequence parallel that input is the (s/t, b, h) slice: pass ``t``."""
    return 2 * s * b * h / t


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
    "activations: Korthikanti et al. 2022, TP (sbh(10 + 24/t + 5as/(ht))) or TP + sequence "
    "parallel (sbh/t (34 + 5as/h)), with the attention "
    "score term 5as/(ht) (conservative with fused/flash attention), K/V at the GQA width, "
    "the MLP at the --ffn-hidden-size width (SwiGLU: gate, up, silu(gate), product); 1F1B keeps "
    "min(PP - stage, micro-batches) micro-batches in flight",
    "recompute: 2sbh per block per micro-batch (block input; 2sbh/t with sequence parallel) + one "
    "block's full working set",
    "last stage: fp32 logits for the loss, b*s*V/t*4 B; not counted: CUDA context, "
    "allocator fragmentation, communication buckets, temporary buffers",
    "time: --tflops is achieved hardware FLOP/s per GPU (pipeline bubble included); the "
    "predicted time models matmuls at --peak-tflops x --efficiency, elementwise passes at HBM "
    "bandwidth, TP all-reduces (NVLink), PP send/recv and the DP all-reduce (InfiniBand, not "
    "overlapped), 1F1B bubble (p-1) slots; no interleaving, no overlap of communication",
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
    sp_ = layout.sequence_parallel
    full = model_activation_bytes_per_layer(cfg, b, t, sp_)
    stored = sp.layers * in_flight
    last = sp.stage == layout.pp - 1
    return StageMemory(
        stage=sp.stage,
        in_flight=in_flight,
        weights=n * weight_b / (d if z >= 3 else 1),
        gradients=n * grad_bytes_per_param(layout.precision, z) / (d if z >= 2 else 1),
        optimizer=n * opt_b / (d if z >= 1 else 1),
        activations_recompute=stored * recompute_bytes_per_layer(s, b, h, t if sp_ else 1)
        + full * (sp.layers > 0),
        activations_no_recompute=stored * full,
        logits=b * s * cfg.padded_vocab_size(t) / t * 4 if last else 0.0,
        checkpoint_activations=layout.checkpoint_activations,
    )


# --- compute -----------------------------------------------------------------------------------


def forward_flops_per_token(cfg: ModelConfig, tp: int = 1) -> float:
    """Matmul FLOPs of one token's forward pass (Narayanan et al. 2021's counting: 2 per
    multiply-add, full s x s scores; norms, softmax, biases and RoPE not counted):
    per block 2h(qkv rows) + 2ha (dense, a = heads x head_dim, h unless --kv-channels) +
    2h(up rows + f) (MLP) + 4sa (scores and the weighted sum over V), plus 2hV for the logits.
    The GPT-2 shape gives 24h^2 + 4sh per block."""
    s, L, h, V = cfg.seq_length, cfg.num_layers, cfg.hidden_size, cfg.padded_vocab_size(tp)
    f, a = cfg.ffn_hidden_size, cfg.attention_dim
    block = 2 * h * qkv_rows(cfg) + 2 * h * a + 2 * h * (mlp_up_rows(cfg) + f) + 4 * s * a
    return L * block + 2 * h * V


def iteration_flops(
    cfg: ModelConfig, global_batch_size: int, recompute: bool, tp: int = 1
) -> float:
    """FLOPs per step: forward x 3 (forward + backward); full recompute runs the blocks'
    forward once more but not the logits. For the GPT-2 shape: Megatron's
    72 Bslh^2 (1 + s/6h + V/12lh), and 96 Bslh^2 (1 + s/6h + V/16lh) with recompute."""
    per_token = (4 if recompute else 3) * forward_flops_per_token(cfg, tp)
    if recompute:  # the logits layer sits outside the checkpointed blocks
        per_token -= 2 * cfg.hidden_size * cfg.padded_vocab_size(tp)
    return global_batch_size * cfg.seq_length * per_token


def bubble_fraction(pp: int, num_micro_batches: int) -> float:
    """1F1B/GPipe idle fraction (p - 1) / (m + p - 1)."""
    return (pp - 1) / (num_micro_batches + pp - 1)


# --- predicted time ----------------------------------------------------------------------------

MTNLG_EFFICIENCY = 0.517
"""Fraction of peak the matmuls reach, calibrated by ``calibrate_efficiency`` on Smith et al.
2022's 60.1 s/iteration (MT-NLG 530B, TP8 x PP35 x DP8, batch 1920, 280 DGX A100, DeepSpeed)."""
MEGATRON_EFFICIENCY = 0.607
"""The same, calibrated on Narayanan et al. 2021 Table 1's 145.6B row (Megatron-LM)."""


@dataclass(frozen=True)
class Hardware:
    """Per-GPU peak and link bandwidths; the defaults are a DGX A100 node."""

    peak_tflops: float = 312.0
    """Dense bf16/fp16 peak per GPU (A100: 312)."""
    efficiency: float = MTNLG_EFFICIENCY
    """Achieved fraction of peak in the matmuls (the one calibrated constant)."""
    nvlink_gbps: float = 230.0
    """GB/s, NCCL all-reduce bus bandwidth inside a node (nccl-tests on DGX A100 report
    ~230 of NVLink3's 300 GB/s per direction)."""
    ib_gbps: float = 25.0
    """GB/s per GPU between nodes (DGX A100: one 200 Gb/s HDR InfiniBand HCA per GPU)."""
    hbm_gbps: float = 2039.0
    """GB/s of GPU memory (A100 80GB SXM: 2039; the A100 40GB: 1555)."""
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        flags = {
            "peak_tflops": "--peak-tflops",
            "efficiency": "--efficiency",
            "nvlink_gbps": "--nvlink-bandwidth-gbps",
            "ib_gbps": "--ib-bandwidth-gbps",
            "hbm_gbps": "--hbm-bandwidth-gbps",
            "gpus_per_node": "--gpus-per-node",
        }
        for name, flag in flags.items():
            if not getattr(self, name) > 0:
                raise PlanError(f"{flag} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class IterationTime:
    """Predicted seconds of one optimizer step on the slowest pipeline (1F1B schedule); each of
    the m micro-batch slots costs matmuls + elementwise + TP + PP time, p - 1 slots are idle."""

    compute: float
    """m x one stage's matmul FLOPs (recompute included) at peak x efficiency."""
    elementwise: float
    """m x 3 passes (forward write, recompute write, backward read) over the activation bytes
    the planner stores (Korthikanti et al.) at HBM bandwidth: norms, softmax, dropout, GeLU."""
    tp_comm: float
    """m x (4 all-reduces per block, 6 with recompute) x 2(t-1)/t x bsh x 2 B."""
    pp_comm: float
    """m x (activation forward + its gradient backward), bsh x 2 B each, per boundary."""
    bubble: float
    """(p - 1) idle micro-batch slots."""
    dp_comm: float
    """Gradient all-reduce 2(d-1)/d x params per rank x grad bytes, not overlapped (DeepSpeed's
    pipeline engine reduces after the last micro-batch)."""

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))


def _time_terms(cfg: ModelConfig, layout: Layout, hw: Hardware) -> IterationTime:
    """The terms at efficiency 1 (only ``compute`` and its share of the bubble scale with it)."""
    t, p, d, m = layout.tp, layout.pp, layout.dp, layout.num_micro_batches
    flops = iteration_flops(cfg, layout.global_batch_size, layout.checkpoint_activations, t)
    compute = flops / layout.world_size / (hw.peak_tflops * 1e12) / m  # per micro-batch
    b = layout.micro_batch_size
    act = b * cfg.seq_length * cfg.hidden_size * (4 if layout.precision == "fp32" else 2)
    blocks = -(-cfg.num_layers // p)  # the fullest stage sets the pace
    stored = model_activation_bytes_per_layer(cfg, b, t, layout.sequence_parallel)
    elementwise = 3 * blocks * stored / (hw.hbm_gbps * 1e9)
    ar = (6 if layout.checkpoint_activations else 4) * blocks * 2 * (t - 1) / t * act
    tp = ar / ((hw.nvlink_gbps if t <= hw.gpus_per_node else hw.ib_gbps) * 1e9)
    # rank order pipe > data > model: stage neighbours are t x d ranks apart, replicas t apart
    pp_link = hw.ib_gbps if t * d >= hw.gpus_per_node else hw.nvlink_gbps
    pp = 2 * act / (pp_link * 1e9) if p > 1 else 0.0
    params = max(sp.params_per_rank for sp in stage_params(cfg, t, p))
    fp32 = layout.precision == "fp32" or (layout.precision == "bf16" and layout.zero_stage == 1)
    dp_link = hw.ib_gbps if t * d > hw.gpus_per_node else hw.nvlink_gbps
    dp = 2 * (d - 1) / d * params * (4 if fp32 else 2) / (dp_link * 1e9)
    slot = compute + elementwise + tp + pp
    return IterationTime(m * compute, m * elementwise, m * tp, m * pp, (p - 1) * slot, dp)


def iteration_time(cfg: ModelConfig, layout: Layout, hw: Hardware) -> IterationTime:
    """Predicted seconds per iteration, term by term (see ``IterationTime``)."""
    at_peak = _time_terms(cfg, layout, hw)
    m, p = layout.num_micro_batches, layout.pp
    compute = at_peak.compute / hw.efficiency
    bubble = at_peak.bubble + (p - 1) / m * (compute - at_peak.compute)
    return dataclasses.replace(at_peak, compute=compute, bubble=bubble)


def calibrate_efficiency(cfg: ModelConfig, layout: Layout, hw: Hardware, seconds: float) -> float:
    """The efficiency at which ``iteration_time`` equals a measured ``seconds`` (the total is
    a / efficiency + c)."""
    at_peak = _time_terms(cfg, layout, hw)
    a = at_peak.compute * (1 + (layout.pp - 1) / layout.num_micro_batches)
    rest = at_peak.total - a
    if seconds <= rest:
        raise PlanError(f"{seconds} s is below the non-matmul time alone ({rest:.3g} s)")
    return a / (seconds - rest)


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
    hardware: Hardware = Hardware()
    time: IterationTime | None = None
    """Predicted from ``hardware`` (``iteration_time``)."""

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
    def predicted_tflops(self) -> float:
        """Hardware TFLOP/s per GPU at the predicted time (recompute counted if on)."""
        return self.flops_per_iteration / self.time.total / self.layout.world_size / 1e12

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
            "hardware": dataclasses.asdict(self.hardware),
            "predicted": dataclasses.asdict(self.time)
            | {
                "seconds_per_iteration": self.time.total,
                "tflops_per_gpu": self.predicted_tflops,
            },
            "assumptions": list(ASSUMPTIONS),
        }


def make_plan(
    cfg: ModelConfig,
    layout: Layout,
    *,
    gpu_memory_gb: float = 80.0,
    tflops: float = 120.0,
    train_tokens: float | None = None,
    hardware: Hardware | None = None,
) -> Plan:
    """Validate the layout against the model and compute the plan (does not refuse on memory)."""
    padded = cfg.padded_vocab_size(layout.tp)
    dims = ParallelDims(layout.world_size, layout.tp, layout.pp)
    dims.validate_config(cfg)
    g, t = cfg.kv_groups, layout.tp
    if g % t and t % g:
        raise ParallelConfigError(
            f"--num-query-groups ({g}) and --tensor-model-parallel-size ({t}): one must divide "
            "the other (groups split over ranks, or ranks sharing a group)"
        )
    if g < t and (2 * cfg.head_dim) % (t // g):
        raise ParallelConfigError(
            f"--num-query-groups ({g}) with --tensor-model-parallel-size ({t}): the K/V rows of a "
            f"group (2 x head dim {cfg.head_dim}) do not split over the {t // g} ranks sharing it"
        )
    if cfg.ffn_hidden_size % layout.tp:
        raise ParallelConfigError(
            f"ffn hidden size ({cfg.ffn_hidden_size}) is not divisible by "
            f"--tensor-model-parallel-size ({layout.tp})"
        )
    if tflops <= 0 or gpu_memory_gb <= 0:
        raise PlanError("--tflops and --gpu-memory-gb must be > 0")
    if layout.sequence_parallel and cfg.seq_length % layout.tp:
        raise ParallelConfigError(
            f"--sequence-parallel: --seq-length ({cfg.seq_length}) is not divisible by "
            f"--tensor-model-parallel-size ({layout.tp})"
        )
    hardware = hardware or Hardware()
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
        hardware=hardware,
        time=iteration_time(cfg, layout, hardware),
    )


def search_layouts(
    cfg: ModelConfig,
    num_gpus: int,
    global_batch_size: int,
    hardware: Hardware,
    *,
    gpu_memory_gb: float = 80.0,
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
    **layout_kw,
) -> list[Plan]:
    """Every TP x PP x DP x micro-batch x recompute layout of ``num_gpus`` that is valid and fits
    ``gpu_memory_gb``, fastest predicted first. TP stays inside a node (powers of two up to
    ``gpus_per_node``); ``layout_kw`` (zero_stage, precision, sequence_parallel) applies to all."""
    plans = []
    tps = [t for t in (1, 2, 4, 8, 16, 32) if t <= hardware.gpus_per_node]
    for t in tps:
        for p in range(1, cfg.num_layers + 1):
            if num_gpus % (t * p):
                continue
            for b in micro_batch_sizes:
                for rc in (False, True):
                    try:
                        layout = Layout(
                            t, p, num_gpus // (t * p), b, global_batch_size,
                            checkpoint_activations=rc, **layout_kw,
                        )  # fmt: skip
                        plan = make_plan(
                            cfg, layout, gpu_memory_gb=gpu_memory_gb, hardware=hardware
                        )
                    except (PlanError, ParallelConfigError, ValueError):
                        continue
                    if plan.fits:
                        plans.append(plan)
    return sorted(plans, key=lambda pl: pl.time.total)
