"""Tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding, LM logits.

Initialisation is TP-invariant: every layer draws the FULL master weight on the CPU in fp32 from
the default CPU generator (seeded identically on every rank by the caller), then keeps its own
partition. A TP=1 and a TP=k model built after the same ``torch.manual_seed`` therefore hold
slices of the same matrices.

Sharded parameters carry the attributes DeepSpeed and Megatron read:
``tensor_model_parallel = True``, ``partition_dim`` and ``partition_stride``. Replicated
parameters (the row-parallel bias) carry none, so DeepSpeed's gradient norm counts them once
(only on TP rank 0) while it sums sharded ones over every TP rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mtnlg.tensor_parallel.mappings import (
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    scatter_to_tp_region,
    tp_rank,
    tp_world_size,
)
from mtnlg.tensor_parallel.sequence import reduce_scatter_to_sequence, sequence_parallel_linear

InitMethod = Callable[[Tensor], None]


def init_method_normal(std: float = 0.02) -> InitMethod:
    """In-place N(0, std^2) initialiser."""

    def init_(tensor: Tensor) -> None:
        nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


def scaled_init_method_normal(std: float, num_layers: int) -> InitMethod:
    """N(0, (std / sqrt(2 * num_layers))^2), for the output projections of residual branches."""
    return init_method_normal(std / (2.0 * num_layers) ** 0.5)


_default_init = init_method_normal(0.02)


# ----------------------------------------------------------------------------------------------
# Partition rules (pure functions, reused by the checkpoint converter)
# ----------------------------------------------------------------------------------------------


def split_tensor_for_rank(
    full: Tensor, dim: int, rank: int, world_size: int, stride: int = 1
) -> Tensor:
    """This rank's shard of ``full`` along ``dim``.

    With ``stride`` s, ``dim`` is viewed as s consecutive blocks (e.g. [q | k | v]); the rank keeps
    the ``rank``-th of ``world_size`` contiguous chunks of every block, concatenated in block
    order (-> [q_r | k_r | v_r]). ``stride=1`` is the plain contiguous split.
    """
    size = full.shape[dim]
    if size % (stride * world_size) != 0:
        raise ValueError(
            f"dimension {dim} of size {size} is not divisible by stride ({stride}) x "
            f"TP size ({world_size}) = {stride * world_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a TP group of {world_size}")
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([block.chunk(world_size, dim=dim)[rank] for block in blocks], dim=dim)


def merge_partitions(parts: Sequence[Tensor], dim: int, stride: int = 1) -> Tensor:
    """Inverse of :func:`split_tensor_for_rank`: the full tensor from every rank's shard (rank order)."""
    if stride == 1:
        return torch.cat(list(parts), dim=dim)
    for i, p in enumerate(parts):
        if p.shape[dim] % stride != 0:
            raise ValueError(
                f"shard {i}: dimension {dim} of size {p.shape[dim]} is not divisible by "
                f"stride {stride}"
            )
    chunks = [p.chunk(stride, dim=dim) for p in parts]  # [rank][block]
    return torch.cat([chunks[r][s] for s in range(stride) for r in range(len(parts))], dim=dim)


def _set_tp_attributes(param: Tensor, partition_dim: int, stride: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def _resolve_device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.get_default_device()


_INIT = {"skip": False, "cpu": False}


@contextmanager
def skip_init() -> Iterator[None]:
    """Parameters built inside are allocated, not drawn: no full master, no random numbers.

    For models whose weights are loaded right after (``--load`` resume, a fine-tuning start,
    a distillation teacher, inference and evaluation): peak host memory is the rank's own
    shard, and nothing is spent on draws that are overwritten.
    """
    before = _INIT["skip"]
    _INIT["skip"] = True
    try:
        yield
    finally:
        _INIT["skip"] = before


def use_cpu_initialization(enabled: bool) -> None:
    """Megatron's ``--use-cpu-initialization``: draw masters on the CPU even on an accelerator."""
    _INIT["cpu"] = bool(enabled)


def init_skipped() -> bool:
    return _INIT["skip"]


def master_device() -> torch.device:
    """Where full masters are drawn: the accelerator (host memory stays O(1); the accelerator's
    generator, seeded identically on every rank, keeps TP=1 and TP=N equal), or the CPU."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if _INIT["cpu"] or acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.current_device_name())


def _init_shard(
    full_shape: tuple[int, ...],
    init_method: InitMethod,
    *,
    dim: int,
    rank: int,
    world_size: int,
    stride: int,
    dtype: torch.dtype,
    device,
) -> nn.Parameter:
    """Draw the full fp32 master weight (on ``master_device()``), keep this rank's shard on
    ``device``; inside ``skip_init()`` only the shard is allocated."""
    if _INIT["skip"]:
        shape = list(full_shape)
        shape[dim] //= world_size
        return nn.Parameter(torch.empty(shape, dtype=dtype, device=_resolve_device(device)))
    master = torch.empty(full_shape, dtype=torch.float32, device=master_device())
    init_method(master)
    shard = split_tensor_for_rank(master, dim, rank, world_size, stride)
    return nn.Parameter(shard.to(device=_resolve_device(device), dtype=dtype).contiguous())


def _check_divisible(what: str, size: int, tp: int, stride: int = 1) -> None:
    if size % (tp * stride) != 0:
        extra = f" x stride ({stride}) = {tp * stride}" if stride != 1 else ""
        raise ValueError(f"{what} ({size}) is not divisible by the TP size ({tp}){extra}")


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class ColumnParallelLinear(nn.Module):
    """Y = XA + b. A is parallelized along its second dimension (output features).

    A = [A_1, ..., A_tp]; rank r computes Y_r = X A_r + b_r. ``weight`` is stored like
    ``nn.Linear``'s: (out_features // tp, in_features). With ``gather_output`` the shards are
    all-gathered into the full (..., out_features) output, else each rank keeps (..., out / tp).

    ``stride`` > 1 splits each of ``stride`` consecutive output blocks separately (the fused
    QKV projection with global layout [q | k | v] becomes [q_r | k_r | v_r] on rank r). Such a
    strided local output must be consumed block-wise (e.g. split into q, k, v); it is not the
    contiguous input shard a :class:`RowParallelLinear` expects.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_group: dist.ProcessGroup | None,
        bias: bool = True,
        gather_output: bool = False,
        init_method: InitMethod = _default_init,
        stride: int = 1,
        params_dtype: torch.dtype = torch.float32,
        device=None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        tp = tp_world_size(tp_group)
        _check_divisible("ColumnParallelLinear out_features", out_features, tp, stride)
        self.in_features = in_features
        self.out_features = out_features
        self.out_features_per_partition = out_features // tp
        self.gather_output = gather_output
        self.stride = stride
        rank = tp_rank(tp_group)

        self.weight = _init_shard(
            (out_features, in_features),
            init_method,
            dim=0,
            rank=rank,
            world_size=tp,
            stride=stride,
            dtype=params_dtype,
            device=device,
        )
        _set_tp_attributes(self.weight, partition_dim=0, stride=stride)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(
                    self.out_features_per_partition,
                    dtype=params_dtype,
                    device=_resolve_device(device),
                )
            )
            _set_tp_attributes(self.bias, partition_dim=0, stride=stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor, skip_bias_add: bool = False):
        """(..., in) -> (..., out / tp); with ``skip_bias_add`` the pair (y, bias), the bias left
        for a fused consumer (e.g. bias-GeLU) to add."""
        # x: (..., in) replicated on every TP rank; its gradient (fresh from F.linear's
        # backward, read by nothing else) is all-reduced in place. With sequence parallelism
        # x is (b, s/tp, in): all-gathered along the sequence (gradient reduce-scattered).
        if skip_bias_add:
            return tp_linear(x, self.weight, None, self.tp_group, self.sequence_parallel), self.bias
        y = tp_linear(x, self.weight, self.bias, self.tp_group, self.sequence_parallel)
        if not self.gather_output:
            return y
        y = gather_from_tp_region(y, self.tp_group)  # (..., out) in [rank 0 | rank 1 | ...] order
        tp = tp_world_size(self.tp_group)
        if self.stride > 1 and tp > 1:  # back to the global [block 0 | block 1 | ...] layout
            y = merge_partitions(y.chunk(tp, dim=-1), dim=-1, stride=self.stride)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"per_partition={self.out_features_per_partition}, bias={self.bias is not None}, "
            f"gather_output={self.gather_output}, stride={self.stride}"
        )


class RowParallelLinear(nn.Module):
    """Y = XA + b. A is parallelized along its first dimension (input features); X arrives split.

    A = [A_1; ...; A_tp] and X = [X_1, ..., X_tp]; rank r computes X_r A_r and the partial
    products are all-reduced (one all-reduce forward, none backward). ``weight`` is stored like
    ``nn.Linear``'s: (out_features, in_features // tp). The bias is full, replicated on every TP
    rank, and added after the all-reduce. With ``input_is_parallel=False`` the full input is
    scattered first.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_group: dist.ProcessGroup | None,
        bias: bool = True,
        input_is_parallel: bool = True,
        init_method: InitMethod = _default_init,
        params_dtype: torch.dtype = torch.float32,
        device=None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        tp = tp_world_size(tp_group)
        _check_divisible("RowParallelLinear in_features", in_features, tp)
        self.in_features = in_features
        self.out_features = out_features
        self.in_features_per_partition = in_features // tp
        self.input_is_parallel = input_is_parallel

        self.weight = _init_shard(
            (out_features, in_features),
            init_method,
            dim=1,
            rank=tp_rank(tp_group),
            world_size=tp,
            stride=1,
            dtype=params_dtype,
            device=device,
        )
        _set_tp_attributes(self.weight, partition_dim=1, stride=1)
        if bias:
            # Replicated: no TP attributes, so grad-norm code counts it once.
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=params_dtype, device=_resolve_device(device))
            )
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor, skip_bias_add: bool = False):
        """(..., in / tp) -> (..., out); with ``skip_bias_add`` the pair (y, bias), the bias left
        for a fused consumer (bias-dropout-add) to add."""
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp_group)  # (..., in) -> (..., in / tp)
        bias = self.bias
        if tp_world_size(self.tp_group) == 1:
            if skip_bias_add:
                return F.linear(x, self.weight), bias
            return F.linear(x, self.weight, bias)  # (..., out), bias fused
        y = F.linear(x, self.weight)  # (..., out) partial sum, saved by no autograd node
        if self.sequence_parallel:  # (b, s, out) -> (b, s/tp, out) summed
            y = reduce_scatter_to_sequence(y, self.tp_group)
            if bias is not None:  # added to a sequence slice: its grad summed over TP
                bias = copy_to_tp_region(bias, self.tp_group)
        else:
            y = reduce_from_tp_region(y, self.tp_group, inplace=True)  # (..., out) full
        if skip_bias_add:
            return y, bias
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"per_partition={self.in_features_per_partition}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding split along the vocabulary: rank r owns rows [r*V/tp, (r+1)*V/tp).

    Each rank looks up the ids it owns, zeroes the rows of the ids it does not, and the partial
    embeddings are all-reduced (exactly one rank contributes each row).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tp_group: dist.ProcessGroup | None,
        init_method: InitMethod = _default_init,
        params_dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.tp_group = tp_group
        tp = tp_world_size(tp_group)
        _check_divisible("VocabParallelEmbedding num_embeddings (vocabulary)", num_embeddings, tp)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_partition = num_embeddings // tp
        rank = tp_rank(tp_group)
        self.vocab_start = rank * self.num_embeddings_per_partition
        self.vocab_end = self.vocab_start + self.num_embeddings_per_partition

        self.weight = _init_shard(
            (num_embeddings, embedding_dim),
            init_method,
            dim=0,
            rank=rank,
            world_size=tp,
            stride=1,
            dtype=params_dtype,
            device=device,
        )
        _set_tp_attributes(self.weight, partition_dim=0, stride=1)

    def forward(self, ids: Tensor) -> Tensor:
        # ids: (...) global token ids
        if tp_world_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)  # (...)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight)  # (..., dim), a fresh temporary
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(out, self.tp_group, inplace=True)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, "
            f"rows=[{self.vocab_start}, {self.vocab_end})"
        )


def tp_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, group, sequence_parallel: bool = False
) -> Tensor:
    """A column-parallel GEMM: (..., in) -> (..., out / tp). Its input passes through
    ``copy_to_tp_region`` (gradient all-reduced in place: it is F.linear's fresh input
    gradient), or with sequence parallelism the (b, s/tp, in) slices are all-gathered
    (gradient reduce-scattered) and only the slice is kept for backward."""
    if sequence_parallel:
        return sequence_parallel_linear(x, weight, bias, group)
    return F.linear(copy_to_tp_region(x, group, inplace=True), weight, bias)


def parallel_lm_logits(
    hidden: Tensor,
    word_embeddings_weight: Tensor,
    group: dist.ProcessGroup | None,
    sequence_parallel: bool = False,
) -> Tensor:
    """(..., h) x (V/tp, h)^T -> (..., V/tp) logits shard; copy_to_tp_region on the input so the
    backward all-reduces dL/dhidden (with sequence parallelism: (b, s/tp, h) all-gathered).

    Feed the result to :func:`mtnlg.tensor_parallel.vocab_parallel_cross_entropy`; the full
    (..., V) logits are never materialised.
    """
    return tp_linear(hidden, word_embeddings_weight, None, group, sequence_parallel)
