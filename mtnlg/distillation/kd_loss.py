"""Knowledge-distillation losses over vocab-parallel logits, without gathering them.

Student and teacher logits arrive as this rank's vocabulary shard (b, s, V/tp), padding columns
set to -inf in both. Per token, only (b, s)-sized tensors cross TP ranks: the two global maxima
(one all-reduce MAX), the two sums of exponentials (one all-reduce SUM) and the KL partial sums
(one all-reduce SUM). Gradients flow by plain autograd through the TP mappings: the sums of
exponentials feed rank-local terms, so they are all-reduced in backward too (reduce, then copy);
the KL sum feeds the replicated loss, so its backward is the identity (reduce alone).

With temperature T and tempered distributions p = softmax(z_teacher / T), q = softmax(z_student
/ T), the per-token terms are scaled by T² (Hinton et al. 2015) so gradient magnitudes do not
shrink with T:

* ``forward-kl``: T² KL(p || q) = T² sum_v p (log p - log q)   (mass-covering, DistilBERT's)
* ``reverse-kl``: T² KL(q || p) = T² sum_v q (log q - log p)   (mode-seeking, MiniLLM's)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mtnlg.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from mtnlg.tensor_parallel.mappings import (
    copy_to_tp_region,
    reduce_from_tp_region,
    tp_world_size,
)

KD_MODES = ("forward-kl", "reverse-kl")

# Stand-in for -inf (padding columns): exp() of it is exactly 0, and differences of two of them
# are 0, so 0 * log 0 terms vanish without NaNs in values or gradients.
_NEG = torch.finfo(torch.float32).min / 4


def _log_softmax_shard(z: Tensor, group) -> Tensor:
    """log softmax over the full (sharded) last dim of fp32 finite logits z: (b, s, V/tp)."""
    with torch.no_grad():  # the max only stabilises; the result does not depend on it
        m = z.amax(dim=-1)  # (b, s)
        if tp_world_size(group) > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shifted = z - m.unsqueeze(-1)  # (b, s, V/tp)
    # The global sum feeds rank-local terms, so its gradient is the sum of every rank's:
    # all-reduce forward (reduce) and all-reduce backward (copy).
    sum_exp = copy_to_tp_region(reduce_from_tp_region(shifted.exp().sum(dim=-1), group), group)
    return shifted - sum_exp.log().unsqueeze(-1)


def vocab_parallel_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    group=None,
    temperature: float = 1.0,
    mode: str = "forward-kl",
) -> Tensor:
    """Per-token T²-scaled KL (b, s) from vocab-parallel logit shards (b, s, V/tp).

    ``mode`` is ``forward-kl`` (KL(teacher || student)) or ``reverse-kl`` (KL(student ||
    teacher)). Computed in fp32 whatever the logits' dtype; the teacher gets no gradient.
    Shards must have equal shapes (same vocabulary, same padding, same TP degree).
    """
    if mode not in KD_MODES:
        raise ValueError(f"--kd-loss {mode!r}: choose one of {', '.join(KD_MODES)}")
    if temperature <= 0:
        raise ValueError(f"--kd-temperature must be > 0 (got {temperature})")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: teacher and student vocabularies "
            "(and their padding / TP degree) must match"
        )
    inv_t = 1.0 / temperature
    s = student_logits.float()
    s = torch.where(torch.isfinite(s), s * inv_t, _NEG)  # (b, s, V/tp)
    t = teacher_logits.detach().float()
    t = torch.where(torch.isfinite(t), t * inv_t, _NEG)
    log_q = _log_softmax_shard(s, group)  # student
    with torch.no_grad():
        log_p = _log_softmax_shard(t, group)  # teacher
    kl = reduce_from_tp_region(kl_terms(log_p, log_q, mode), group)
    return kl * (temperature * temperature)


def kl_terms(log_p: Tensor, log_q: Tensor, mode: str) -> Tensor:
    """Sum over the last dim of p (log p - log q) (forward) or q (log q - log p) (reverse)."""
    if mode == "forward-kl":
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)


def _masked_mean(x: Tensor, loss_mask: Tensor | None) -> Tensor:
    if loss_mask is None:
        return x.mean()
    loss_mask = loss_mask.to(x.dtype)
    return (x * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    loss_mask: Tensor | None = None,
    group=None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    mode: str = "forward-kl",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``alpha * mean(T² KL) + (1 - alpha) * mean(CE)``; returns (loss, ce, kl) scalars.

    ``teacher_logits`` may be None only when ``alpha == 0`` (cross-entropy alone).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--kd-alpha must be in [0, 1] (got {alpha})")
    ce = _masked_mean(vocab_parallel_cross_entropy(student_logits, labels, group), loss_mask)
    if alpha == 0.0:
        return ce, ce.detach(), None
    if teacher_logits is None:
        raise ValueError("teacher logits are required when --kd-alpha > 0")
    kl = _masked_mean(
        vocab_parallel_kl(student_logits, teacher_logits, group, temperature, mode), loss_mask
    )
    loss = alpha * kl if alpha == 1.0 else alpha * kl + (1.0 - alpha) * ce
    return loss, ce.detach(), kl.detach()
