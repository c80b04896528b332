"""Cross-entropy over logits split along the vocabulary, without gathering them.

Per token, only three scalars cross ranks: the global max logit (all-reduce MAX), the target's
logit (all-reduce SUM; only its owner contributes) and the sum of exponentials (all-reduce SUM).
So the traffic is 3 x (...) values, never (..., V).
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
    def forward(ctx, logits: Tensor, target: Tensor, group) -> Tensor:
        # logits: (..., V/tp) this rank's vocab shard; target: (...) global ids
        ctx.input_dtype = logits.dtype
        logits = logits.to(torch.float32, copy=True)  # own fp32 buffer: the caller's is untouched
        vocab_per_rank = logits.shape[-1]
        start = tp_rank(group) * vocab_per_rank
        end = start + vocab_per_rank

        # Numerical stability: subtract the global max (over all ranks' shards).
        logits_max = logits.amax(dim=-1)  # (...)
        _all_reduce_(logits_max, dist.ReduceOp.MAX, group)
        logits.sub_(logits_max.unsqueeze(-1))

        # The target's logit: only the rank owning the id contributes.
        outside = (target < start) | (target >= end)  # (...)
        local_target = (target - start).masked_fill(outside, 0)  # (...)
        predicted = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)  # (...)
        predicted.masked_fill_(outside, 0.0)
        _all_reduce_(predicted, dist.ReduceOp.SUM, group)

        exp_logits = logits.exp_()  # (..., V/tp), in place over the fp32 copy
        sum_exp = exp_logits.sum(dim=-1)  # (...)
        _all_reduce_(sum_exp, dist.ReduceOp.SUM, group)

        loss = torch.log(sum_exp) - predicted  # (...)

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))  # (..., V/tp)
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        # dL/dlogits = softmax - onehot(target), all local. The saved softmax is overwritten in
        # place (no second (..., V/tp) buffer), so backward through this node runs once.
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax
        vocab_per_rank = grad.shape[-1]
        grad_2d = grad.view(-1, vocab_per_rank)
        rows = torch.arange(grad_2d.shape[0], device=grad.device)
        inside = (~outside).view(-1).to(grad.dtype)
        grad_2d[rows, local_target.view(-1)] -= inside
        grad.mul_(grad_loss.unsqueeze(-1).to(grad.dtype))
        return grad.to(ctx.input_dtype), None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, group) -> Tensor:
    """logits: (..., V/tp) this rank's vocab shard; target: (...) global ids. Returns per-token loss (...).

    Only (...)-sized tensors cross ranks (max all-reduce, predicted-logit all-reduce, sum-exp
    all-reduce); never the full logits. The backward computes softmax - onehot locally.
    Numerically stable (the global max is subtracted). Works for fp32, bf16 and fp16 logits:
    computed in fp32, the loss is fp32, the gradient has the logits' dtype.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, group)
