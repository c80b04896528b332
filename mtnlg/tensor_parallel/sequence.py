"""Sequence parallelism (Korthikanti et al. 2022): the collectives along the sequence dimension.

With ``--sequence-parallel`` the regions between tensor-parallel layers (LayerNorms, dropouts,
residual adds) hold (b, s/tp, h): each TP rank keeps its own slice of the sequence. A
column-parallel layer all-gathers its input along the sequence (its backward reduce-scatters
the input gradient) and a row-parallel layer reduce-scatters its output (its backward
all-gathers): the same bytes as the all-reduce they replace, with activations tp times smaller.

=================================  ==============================  ===========================
function                           forward                         backward
=================================  ==============================  ===========================
``scatter_to_sequence``            keep own slice of dim 1         all-gather dim 1
``gather_from_sequence``           all-gather dim 1                reduce-scatter dim 1
``reduce_scatter_to_sequence``     reduce-scatter dim 1            all-gather dim 1
``sequence_parallel_linear``       all-gather dim 1, then GEMM     all-gather again, GEMMs,
                                                                   reduce-scatter dim 1
=================================  ==============================  ===========================

``sequence_parallel_linear`` keeps only this rank's (b, s/tp, h) slice for its backward and
all-gathers it again there (Megatron's ``LinearWithGradAccumulationAndAsyncCommunication``):
autograd through ``gather_from_sequence`` + ``F.linear`` would keep the gathered (b, s, h)
input, 2sbh per column-parallel GEMM instead of the 2sbh/tp of Korthikanti et al.'s eq. 4.

Sequence slices are contiguous, in TP rank order. The reduce-scatter is the backend's own on
every backend (gloo has one since torch 2.x; NCCL's is the one that matters): 1/tp of an
all-reduce's output traffic (tests/distributed/test_sequence_collectives.py compares it with an
all-reduce followed by taking one's slice).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mtnlg.tensor_parallel.mappings import tp_rank, tp_world_size


def _split_seq(x: Tensor, group) -> Tensor:
    world = tp_world_size(group)
    if x.shape[1] % world:
        raise ValueError(
            f"sequence length {x.shape[1]} is not divisible by the TP size ({world}), which "
            "--sequence-parallel needs"
        )
    return x.chunk(world, dim=1)[tp_rank(group)].contiguous()


def _gather_seq(x: Tensor, group) -> Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=1)


def _reduce_scatter_seq(x: Tensor, group) -> Tensor:
    world = tp_world_size(group)
    if x.shape[1] % world:
        raise ValueError(f"sequence length {x.shape[1]} is not divisible by the TP size ({world})")
    parts = [p.contiguous() for p in x.chunk(world, dim=1)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _SequenceParallelLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group = group
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)  # the (b, s/tp, h) slice, not the gathered input
        return torch.nn.functional.linear(_gather_seq(x, group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        full = _gather_seq(x, ctx.group)  # (b, s, h) again, freed when backward returns
        grad_in = _reduce_scatter_seq(grad.matmul(weight), ctx.group)  # (b, s/tp, h)
        g2 = grad.reshape(-1, grad.shape[-1])  # (b*s, out/tp)
        grad_w = g2.t().matmul(full.reshape(-1, full.shape[-1]))  # (out/tp, h)
        grad_b = g2.sum(0) if ctx.has_bias else None
        return grad_in, grad_w, grad_b, None


def sequence_parallel_linear(x: Tensor, weight: Tensor, bias: Tensor | None, group) -> Tensor:
    """(b, s/tp, h) slice -> F.linear(all-gathered (b, s, h), weight, bias): (b, s, out/tp).
    Keeps the slice for backward (re-gathered there); the input gradient is reduce-scattered."""
    if tp_world_size(group) == 1:
        return torch.nn.functional.linear(x, weight, bias)
    return _SequenceParallelLinear.apply(x, weight, bias, group)


def scatter_to_sequence(x: Tensor, group) -> Tensor:
    """(b, s, h) replicated -> (b, s/tp, h) this rank's slice; backward all-gathers."""
    if tp_world_size(group) == 1:
        return x
    return _ScatterToSequence.apply(x, group)


def gather_from_sequence(x: Tensor, group) -> Tensor:
    """(b, s/tp, h) -> (b, s, h); backward reduce-scatters (the consumer is tensor-parallel:
    each rank's input gradient is a partial sum)."""
    if tp_world_size(group) == 1:
        return x
    return _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x: Tensor, group) -> Tensor:
    """(b, s, h) partial sums -> (b, s/tp, h) of the summed tensor; backward all-gathers."""
    if tp_world_size(group) == 1:
        return x
    return _ReduceScatterToSequence.apply(x, group)
