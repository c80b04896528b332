"""The fused QKV projection of grouped-query attention (GQA/MQA), column-parallel.

Global layout (Megatron-LM's): for each key/value group j = 0..g-1 the rows
``[q heads of group j (n*d) | k_j (d) | v_j (d)]``, n = nh/g query heads per group, d head dim;
shape ((nh + 2g) d, h). Under TP t:

* ``g % t == 0``: rank r holds a contiguous block of g/t whole groups;
* ``t % g == 0`` (fewer groups than ranks, MQA included): the m = t/g ranks sharing group
  j = r // m each hold nh/t of its query heads and 1/m of its [k_j | v_j] rows, so every element
  lives on exactly one rank (gradient norms and optimizer state stay exact). The forward
  all-gathers the group's K/V rows; the backward sums their gradients over the sharing ranks
  and each keeps its own rows.

A local output is ``groups_local`` blocks of [q (n_l heads) | k | v], consumed by
``split_heads``: query head i of this rank uses local key/value head i // n_l.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtnlg.tensor_parallel.layers import (
    InitMethod,
    _resolve_device,
    _set_tp_attributes,
    init_skipped,
    master_device,
    tp_linear,
)
from mtnlg.tensor_parallel.mappings import tp_rank, tp_world_size


def check_gqa_tp(nh: int, g: int, d: int, tp: int) -> None:
    if nh % tp:
        raise ValueError(f"--num-attention-heads ({nh}) is not divisible by the TP size ({tp})")
    if g % tp and tp % g:
        raise ValueError(
            f"--num-query-groups ({g}) and the TP size ({tp}): one must divide the other"
        )
    if g < tp and (2 * d) % (tp // g):
        raise ValueError(f"K/V rows of a group (2 x {d}) do not split over {tp // g} ranks")


def gqa_local_rows(nh: int, g: int, d: int, tp: int) -> int:
    """Rows of one rank's shard: g/t whole groups, or nh/t query heads + 1/m of a group's K/V."""
    check_gqa_tp(nh, g, d, tp)
    if g % tp == 0:
        return (nh + 2 * g) * d // tp
    return nh // tp * d + 2 * d // (tp // g)


def gqa_split(full: Tensor, nh: int, g: int, d: int, tp: int, rank: int) -> Tensor:
    """This rank's rows (dim 0) of a full fused-QKV weight or bias in the global layout."""
    check_gqa_tp(nh, g, d, tp)
    if g % tp == 0:
        return full.chunk(tp, dim=0)[rank]
    m, n = tp // g, nh // g
    block = full[(rank // m) * (n + 2) * d :][: (n + 2) * d]  # group j: (n + 2) d rows
    q, kv = block[: n * d], block[n * d :]
    s = rank % m
    return torch.cat([q.chunk(m, dim=0)[s], kv.chunk(m, dim=0)[s]], dim=0)


def gqa_merge(parts: list[Tensor], nh: int, g: int, d: int) -> Tensor:
    """Inverse of ``gqa_split``: the full rows from every rank's shard (rank order)."""
    tp = len(parts)
    check_gqa_tp(nh, g, d, tp)
    if g % tp == 0:
        return torch.cat(parts, dim=0)
    m, q_rows = tp // g, nh // tp * d
    blocks = []
    for j in range(g):
        own = parts[j * m : (j + 1) * m]
        blocks += [p[:q_rows] for p in own] + [p[q_rows:] for p in own]
    return torch.cat(blocks, dim=0)


class _GatherGroupKV(torch.autograd.Function):
    """[q rows | this rank's K/V rows] -> [q rows | the group's K/V rows]; grads summed back."""

    @staticmethod
    def forward(ctx, w: Tensor, q_rows: int, g: int, m: int, group) -> Tensor:
        rank, tp = dist.get_rank(group), dist.get_world_size(group)
        ctx.q_rows, ctx.g, ctx.m, ctx.group, ctx.rank = q_rows, g, m, group, rank
        piece = w[q_rows:].contiguous()
        pieces = [torch.empty_like(piece) for _ in range(tp)]
        dist.all_gather(pieces, piece, group=group)
        j = rank // m
        return torch.cat([w[:q_rows], *pieces[j * m : (j + 1) * m]], dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        j, s = ctx.rank // ctx.m, ctx.rank % ctx.m
        grad_kv = grad[ctx.q_rows :]  # (2d, ...) this rank's share of group j's K/V gradient
        buf = grad.new_zeros((ctx.g, *grad_kv.shape))
        buf[j] = grad_kv
        dist.all_reduce(buf, group=ctx.group)  # buf[j]: summed over the m sharing ranks
        own = buf[j].chunk(ctx.m, dim=0)[s]
        return torch.cat([grad[: ctx.q_rows], own], dim=0), None, None, None, None


class GQAQKVLinear(nn.Module):
    """Fused Q/K/V of ``nh`` query heads in ``g`` key/value groups, column-parallel over TP."""

    def __init__(
        self,
        hidden: int,
        nh: int,
        g: int,
        d: int,
        *,
        tp_group,
        bias: bool,
        init_method: InitMethod,
        params_dtype: torch.dtype = torch.float32,
        device=None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        tp, rank = tp_world_size(tp_group), tp_rank(tp_group)
        check_gqa_tp(nh, g, d, tp)
        self.tp_group, self.nh, self.g, self.d = tp_group, nh, g, d
        self.replicated = g < tp  # groups shared by several ranks
        self.groups_local = 1 if self.replicated else g // tp
        self.heads_local = nh // tp
        self.q_rows = self.heads_local * d
        dev = _resolve_device(device)
        rows = (nh + 2 * g) * d
        if init_skipped():  # weights follow: allocate this rank's rows only
            shard = torch.empty((gqa_local_rows(nh, g, d, tp), hidden))
        else:
            master = torch.empty((rows, hidden), dtype=torch.float32, device=master_device())
            init_method(master)  # the full master: TP-invariant draws
            shard = gqa_split(master, nh, g, d, tp, rank)
        self.weight = nn.Parameter(shard.to(device=dev, dtype=params_dtype).contiguous())
        _set_tp_attributes(self.weight, partition_dim=0, stride=1)
        self.weight.gqa_layout = (nh, g, d)
        if bias:
            self.bias = nn.Parameter(torch.zeros(shard.shape[0], dtype=params_dtype, device=dev))
            _set_tp_attributes(self.bias, partition_dim=0, stride=1)
            self.bias.gqa_layout = (nh, g, d)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        # x: (b, s, h) replicated -> (b, s, (nh_l + 2 g_l) d) in local group blocks
        w, b = self.weight, self.bias
        if self.replicated:
            m = tp_world_size(self.tp_group) // self.g
            w = _GatherGroupKV.apply(w, self.q_rows, self.g, m, self.tp_group)
            if b is not None:
                b = _GatherGroupKV.apply(b, self.q_rows, self.g, m, self.tp_group)
            # -> the local rows [q (nh/t heads) | k_j | v_j]: one group block
        return tp_linear(x, w, b, self.tp_group, self.sequence_parallel)

    def split_heads(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(b, s, rows) -> q (b, nh_l, s, d), k and v (b, g_l, s, d)."""
        b, s, _ = y.shape
        n_l = self.heads_local // self.groups_local
        y = y.view(b, s, self.groups_local, n_l + 2, self.d)
        q = y[:, :, :, :n_l].reshape(b, s, self.heads_local, self.d)
        k, v = y[:, :, :, n_l], y[:, :, :, n_l + 1]  # (b, s, g_l, d)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
