"""Cross-entropy over logits split along the vocabulary, without gathering them.

Per token, only three scalars cross ranks: the global max logit (all-reduce MAX), the target's
logit (all-reduce SUM; only its owner contributes) and the sum of exponentials (all-reduce SUM).
So the traffic is 3 x (...) values, never (..., V).

Memory: the (..., V/tp) work happens in one fp32 buffer, the exponentials of the shifted logits,
kept for backward, where it becomes the gradient in place (as Megatron's vocab-parallel CE). With
``inplace=True`` (fp32 logits that the caller no longer needs, e.g. straight out of the output
layer) that buffer is the logits tensor itself, so no (..., V/tp) copy is made at all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mtnlg.tensor_parallel.mappings import tp_rank, tp_world_size


def _all_reduce_(x: Tensor, op, group) -> None:
    if tp_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, group, vocab_size, inplace: bool) -> Tensor:
        # logits: (..., V/tp) this rank's vocab shard; target: (...) global ids
        ctx.input_dtype = logits.dtype
        if inplace and logits.dtype == torch.float32 and logits.is_contiguous():
            work = logits  # the caller's temporary becomes the work buffer
        else:
            work = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        vocab_per_rank = work.shape[-1]
        start = tp_rank(group) * vocab_per_rank
        end = start + vocab_per_rank
        if vocab_size is not None and vocab_size < end:  # padding columns: out of the softmax
            work[..., max(vocab_size - start, 0) :].fill_(float("-inf"))

        # Numerical stability: subtract the global max (over all ranks' shards).
        logits_max = work.amax(dim=-1)  # (...)
        _all_reduce_(logits_max, dist.ReduceOp.MAX, group)
        work.sub_(logits_max.unsqueeze(-1))

        # The target's logit: only the rank owning the id contributes.
        outside = (target < start) | (target >= end)  # (...)
        local_target = (target - start).masked_fill(outside, 0)  # (...)
        predicted = work.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)  # (...)
        predicted.masked_fill_(outside, 0.0)
        _all_reduce_(predicted, dist.ReduceOp.SUM, group)

        exp_logits = work.exp_()  # (..., V/tp), in place
        sum_exp = exp_logits.sum(dim=-1)  # (...)
        _all_reduce_(sum_exp, dist.ReduceOp.SUM, group)

        loss = torch.log(sum_exp) - predicted  # (...)
        # softmax = exp_logits / sum_exp is formed in backward, fused with the upstream scale.
        ctx.save_for_backward(exp_logits, sum_exp, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        # dL/dlogits = g * (softmax - onehot(target)), all local, g the upstream (...) gradient.
        # The saved exponentials are overwritten in place (no second (..., V/tp) buffer), so
        # backward through this node runs once.
        exp_logits, sum_exp, outside, local_target = ctx.saved_tensors
        g = grad_loss.to(torch.float32)  # (...)
        grad = exp_logits.mul_((g / sum_exp).unsqueeze(-1))  # (..., V/tp) = g * softmax
        onehot = (g * (~outside).to(g.dtype)).unsqueeze(-1)  # (..., 1): g where this rank owns it
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot)
        return grad.to(ctx.input_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: Tensor,
    target: Tensor,
    group,
    *,
    vocab_size: int | None = None,
    inplace: bool = False,
) -> Tensor:
    """logits: (..., V/tp) this rank's vocab shard; target: (...) global ids. Returns per-token loss (...).

    Only (...)-sized tensors cross ranks (max all-reduce, predicted-logit all-reduce, sum-exp
    all-reduce); never the full logits. The backward computes softmax - onehot locally.
    Numerically stable (the global max is subtracted). Works for fp32, bf16 and fp16 logits:
    computed in fp32, the loss is fp32, the gradient has the logits' dtype.

    ``vocab_size``: the real (unpadded) vocabulary; columns of global id >= ``vocab_size`` are
    padding and take no probability mass (as if -inf), whatever their value, and get a zero
    gradient. ``inplace``: the caller's fp32 ``logits`` are a temporary it no longer reads
    (Megatron's contract): they are used as the work buffer and overwritten, so no
    (..., V/tp) copy is made. By default the input is left untouched.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_size, inplace)
