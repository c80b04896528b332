"""The four tensor-parallel collectives, as tiny autograd functions.

Each takes the TP process group as an argument (never a global). ``group=None`` or a group of
size 1 means "no tensor parallelism": every function is then the identity and touches no
process group. Collectives go through ``torch.distributed`` (NCCL on GPUs, gloo on the CPU).

=========================  ===============================  ===============================
function                   forward                          backward
=========================  ===============================  ===============================
``copy_to_tp_region``      identity                         all-reduce (sum) over the group
``reduce_from_tp_region``  all-reduce (sum) over the group  identity
``scatter_to_tp_region``   keep own chunk of the last dim   all-gather the last dim
``gather_from_tp_region``  all-gather the last dim          keep own chunk of the last dim
=========================  ===============================  ===============================

``copy``/``reduce`` are Megatron's ``f``/``g`` conjugate pair: a column-parallel layer starts with
``copy`` (its input is replicated, so its input gradient is the sum of the ranks' partial
gradients) and a row-parallel layer ends with ``reduce`` (its output is the sum of the ranks'
partial products).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def tp_world_size(group: dist.ProcessGroup | None) -> int:
    """Size of the TP group; 1 for ``None``."""
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank inside the TP group; 0 for ``None``."""
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: Tensor, group, inplace: bool = False) -> Tensor:
    """Sum over the group: in ``x`` itself when ``inplace`` (and ``x`` is contiguous), else into a
    fresh contiguous tensor (the input is left untouched)."""
    if tp_world_size(group) == 1:
        return x
    out = x if inplace and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _split_last_dim(x: Tensor, group) -> Tensor:
    """Keep this rank's contiguous chunk of the last dimension: (..., n) -> (..., n / tp)."""
    world = tp_world_size(group)
    if world == 1:
        return x
    if x.shape[-1] % world != 0:
        raise ValueError(
            f"last dimension ({x.shape[-1]}) is not divisible by the TP group size ({world})"
        )
    return x.chunk(world, dim=-1)[tp_rank(group)].contiguous()


def _gather_last_dim(x: Tensor, group) -> Tensor:
    """Concatenate the ranks' tensors along the last dim, in rank order: (..., n) -> (..., tp*n)."""
    world = tp_world_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class _CopyToTPRegion(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce the gradient."""

    @staticmethod
    def forward(ctx, x, group, inplace):
        ctx.group, ctx.inplace = group, inplace
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group, ctx.inplace), None, None


class _ReduceFromTPRegion(torch.autograd.Function):
    """Forward: all-reduce. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group, inplace):
        out = _all_reduce(x, group, inplace)
        if out is x:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _ScatterToTPRegion(torch.autograd.Function):
    """Forward: keep own chunk of the last dim. Backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad, ctx.group), None


class _GatherFromTPRegion(torch.autograd.Function):
    """Forward: all-gather the last dim. Backward: keep own chunk of the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.group), None


def copy_to_tp_region(
    x: Tensor, group: dist.ProcessGroup | None, *, inplace: bool = False
) -> Tensor:
    """Identity forward; all-reduce (sum) of the gradient over ``group`` backward.

    ``inplace``: the gradient arriving in backward is the caller's own temporary (e.g. the
    input gradient of the one linear layer that consumes the result), reduced in place instead
    of copied first (Megatron's ``f``).
    """
    if tp_world_size(group) == 1:
        return x
    return _CopyToTPRegion.apply(x, group, inplace)


def reduce_from_tp_region(
    x: Tensor, group: dist.ProcessGroup | None, *, inplace: bool = False
) -> Tensor:
    """All-reduce (sum) over ``group`` forward; identity backward.

    ``inplace``: ``x`` is a temporary the caller no longer reads (e.g. a partial product that no
    autograd node saved); it is reduced in place instead of copied first (Megatron's ``g``).
    """
    if tp_world_size(group) == 1:
        return x
    return _ReduceFromTPRegion.apply(x, group, inplace)


def scatter_to_tp_region(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """(..., n) -> (..., n / tp): this rank's chunk forward; all-gather of the gradient backward."""
    if tp_world_size(group) == 1:
        return x
    return _ScatterToTPRegion.apply(x, group)


def gather_from_tp_region(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """(..., n) -> (..., tp*n) concatenated in rank order forward; own chunk of the grad backward."""
    if tp_world_size(group) == 1:
        return x
    return _GatherFromTPRegion.apply(x, group)
