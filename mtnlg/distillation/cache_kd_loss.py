"""Distillation loss from the teacher cache: KL on the teacher's top-k support, vocab-parallel.

Per token the cache holds the teacher's k largest logits ``t`` and their ids. Both
distributions are renormalised on that support, tempered by T:

    p = softmax(t / T),  q = softmax(z_student[ids] / T)   over the k ids
    forward-kl: T² KL(p || q),  reverse-kl: T² KL(q || p)

With k = the whole vocabulary this is exactly the online KL (``kd_loss.vocab_parallel_kl``);
a smaller k only truncates. The student's logits stay sharded (b, s, V/tp): each rank picks the
entries of the ids it owns (0 elsewhere) and one all-reduce SUM gives every rank the (b, s, k)
student logits on the support, so only b×s×k values cross TP ranks. Its backward is the
identity (the loss is replicated on every TP rank), and the gather scatters each gradient
back to the owning rank's column.

The cached top-k rides with the labels (:class:`KDLabels`): the plain engine passes it to the
model's forward, the pipeline engine carries it to the last stage's ``loss_fn``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtnlg.distillation.kd_loss import KD_MODES, _masked_mean, kl_terms
from mtnlg.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from mtnlg.tensor_parallel.mappings import reduce_from_tp_region, tp_rank


class KDLabels(tuple):
    """(labels (b, s), top-k ids (b, s, k) int64, top-k teacher logits (b, s, k), lse (b, s)).

    A tuple: DeepSpeed's pipeline engine, and ``mtnlg.training.loop.to_device`` for the plain
    engine, move each element to the device."""


def gather_support(logits: Tensor, ids: Tensor, group=None) -> Tensor:
    """Student logits at global ``ids`` (b, s, k) from this rank's shard (b, s, V/tp)."""
    shard = logits.shape[-1]
    start = tp_rank(group) * shard
    local = ids - start  # (b, s, k)
    mine = (local >= 0) & (local < shard)
    picked = logits.gather(-1, local.clamp(0, shard - 1))  # (b, s, k)
    picked = torch.where(mine, picked.float(), 0.0)
    return reduce_from_tp_region(picked, group)


def topk_kl(
    student_logits: Tensor,
    ids: Tensor,
    teacher_values: Tensor,
    group=None,
    temperature: float = 1.0,
    mode: str = "forward-kl",
) -> Tensor:
    """Per-token T²-scaled KL (b, s) on the teacher's top-k support, both renormalised."""
    if mode not in KD_MODES:
        raise ValueError(f"--kd-loss {mode!r}: choose one of {', '.join(KD_MODES)}")
    s = gather_support(student_logits, ids, group) / temperature  # (b, s, k)
    log_q = torch.log_softmax(s, dim=-1)
    with torch.no_grad():
        log_p = torch.log_softmax(teacher_values.float() / temperature, dim=-1)
    return kl_terms(log_p, log_q, mode) * (temperature * temperature)


class CacheKDLoss(nn.Module):
    """``alpha * T² KL_topk + (1 - alpha) * CE`` with :class:`KDLabels`; plain labels (or a
    (labels, loss mask) pair, e.g. evaluation): the cross-entropy alone, as ``GPTLoss``.

    Used as ``GPTModel.loss_fn`` (PP = 1) and as the pipeline's ``loss_fn`` (PP > 1)."""

    def __init__(self, tp_group, vocab_size: int, kd):
        super().__init__()
        self.tp_group, self.vocab_size, self.kd = tp_group, vocab_size, kd

    def forward(self, logits: Tensor, labels, inplace: bool = False) -> Tensor:
        # logits: (b, s, V/tp), padding columns unmasked (excluded here)
        # the pipeline engine hands the labels over as a plain tuple (4 tensors)
        if not (isinstance(labels, (tuple, list)) and len(labels) == 4):
            mask = None
            if isinstance(labels, (tuple, list)):
                labels, mask = labels
            ce = vocab_parallel_cross_entropy(
                logits, labels, self.tp_group, vocab_size=self.vocab_size, inplace=inplace
            )
            return _masked_mean(ce, mask)
        labels, ids, values, _lse = labels
        kd = self.kd
        ce = None
        if kd.alpha < 1.0:
            ce = vocab_parallel_cross_entropy(
                logits, labels, self.tp_group, vocab_size=self.vocab_size
            ).mean()
        if kd.alpha == 0.0:
            return ce
        kl = topk_kl(logits, ids, values, self.tp_group, kd.temperature, kd.mode).mean()
        return kd.alpha * kl if ce is None else kd.alpha * kl + (1.0 - kd.alpha) * ce
