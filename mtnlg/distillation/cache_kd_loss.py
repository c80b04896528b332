"""Distillation losses from the teacher cache: the teacher's top-k ids plus one "rest" bucket,
or plus ids sampled from its tail.

Per token the cache holds the teacher's k largest logits t_i, their ids K and the teacher's
full-vocabulary log-sum-exp LSE_T(t) = log sum_v exp(t_v / T) at the student's temperature T.
``topk-rest`` (the default) is the exact KL between teacher and student coarse-grained onto the
k + 1 buckets {i_1, ..., i_k, rest of the vocabulary}:

    teacher  log p_i = t_i / T - LSE_T(t)              p_rest = 1 - sum_i p_i   (>= 0)
    student  log q_i = z_i / T - LSE_T(z)              q_rest = sum_{j not in K} q_j
    forward-kl  T² [sum_i p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)]
    reverse-kl  T² [sum_i q_i (log q_i - log p_i) + q_rest (log q_rest - log p_rest)]

LSE_T(z) runs over the student's whole real vocabulary (padding columns excluded, as
``tensor_parallel/cross_entropy.py``). log p_rest = log1mexp(logsumexp_i log p_i), the support
renormalised first if rounding of the stored values pushed its mass over 1 (then p_rest = 0);
q_rest is summed directly over the non-support columns (no 1 - sum cancellation). A rest term
whose weight (p_rest forward, q_rest reverse) is 0 (e.g. k = V) is 0, in values and gradients;
the log it is weighed against is floored (log q_rest at log of fp32's smallest normal, a
student tail that underflowed; log p_rest at log 2^-24, below which 1 - sum p is rounding), so
no token's loss is infinite. With k = V it is the online KL (``kd_loss.vocab_parallel_kl``):
the buckets are the vocabulary.

Gradients (u = z / T, b(j) the bucket of id j, P_b / Q_b its teacher / student mass):

* forward: d/dz_j = T q_j (1 - P_b(j) / Q_b(j)): on a support id exactly T (q_i - p_i), as full
  KD; outside the support T q_j (1 - p_rest / q_rest), the tail scaled towards the teacher's
  rest mass but keeping the student's own shape inside it.
* reverse: d/dz_j = T q_j (log Q_b(j) - log P_b(j) - KL), KL the bucketed reverse KL.

Vocab-parallel: the student's logits stay sharded (b, s, V/tp). :class:`_SupportLSE` picks the
support logits each rank owns (one all-reduce SUM of b x s x k values) and forms LSE_T and the
rest's log-sum-exp from one all-reduce MAX and one SUM of 2 x (b, s) values; its backward writes
softmax(z/T)/T x (its upstream gradients) plus the support gradients into one (b, s, V/tp)
buffer, the fp32 copy made in the forward (the logits themselves with ``inplace``), as the
cross-entropy does: no (b, s, V) gather, no second vocabulary-sized temporary.

Why a rest bucket, and what the numbers say. Renormalising both distributions on the top-k
(``topk-renorm``, kept as a library option) is the "naive sparse KD" that Anshumann et al. 2025
(Sparse Logit Sampling, ACL) prove biased: it never tells the student how much mass to leave
outside the teacher's head. Their fix, random-sampling KD, stores ids drawn from the teacher
with importance weights (unbiased gradients in expectation, ~12 ids per token) and needs a
different cache; the rest bucket ("ghost token") keeps this one (top-k + the exact log-sum-exp
at T), is deterministic and exact on the head, and drops only the tail's shape (the bucketed KL
lower-bounds the full KL). The demo benchmark (BENCHMARKS.md, "Distillation from a teacher
cache") supports it at T = 1: it beats the renormalised loss there (k = 32, alpha 0.9: ppl 327
vs 357) and, with the labels supplying the tail's shape (alpha 0.5), matches online KD at k = 32
(303.0 vs 303.4). It does not replace online KD's best (261 at alpha 0.9): with logit KL only
(alpha 1) k = 32 is 50 % behind, k = 128 7 %; and at T = 2 it is worse than renormalising (the
bucket then holds ~80 % of the tempered teacher and the student's flat tail misplaces it at
T = 1). Sampling the tail (random-sampling KD) closes that gap: see below.

Sampled tail (a cache written with ``--sampled-k K2``, :func:`sampled_kl`, chosen automatically
by :func:`resolve_cache_loss`). Per token the cache holds the top-k1 and K2 ids s_j drawn with
replacement from the teacher's tail p_T(v) / p_rest (v outside the top-k1) at the cache's one
temperature, with their logits. The loss is the unbiased estimate of the forward KL,

    T² [sum_head p_i (log p_i - log q_i) + p_rest / K2 sum_j (log p_sj - log q_sj)]

(expectation over the draws: the full KL; gradient T (q - p̂), p̂ = p_i on the head and
p_rest count_j / K2 on the sampled ids, in expectation full KD's T (q - p)). The reverse KL's
expectations are under the student, so teacher samples cannot estimate it: refused, as is
``topk-renorm`` (biased on sampled ids). :class:`_SupportLSE` runs without its rest sum
(``with_rest=False``): sampled ids repeat, the support logits, LSE_T and the gradients (repeats
summed by the scatter) stay exact. On the demo benchmark (T = 1, alpha = 1, 32 entries per
token) top-8 + 24 sampled ids is +0.7 % from online KD on seeds 1-3 (+7.9 % over 6 seeds)
where top-32 + rest is +50 %, and beats CE on every seed (BENCHMARKS.md).

The cached top-k rides with the labels (:class:`KDLabels`): the plain engine passes it to the
model's forward, the pipeline engine carries it to the last stage's ``loss_fn``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtnlg.distillation.kd_loss import KD_MODES, _masked_mean, kl_terms
from mtnlg.tensor_parallel.cross_entropy import _all_reduce_, vocab_parallel_cross_entropy
from mtnlg.tensor_parallel.mappings import reduce_from_tp_region, tp_rank, tp_world_size

CACHE_KD_LOSSES = ("topk-rest", "topk-renorm")  # --cache-kd-loss; "topk-sampled" is automatic
LOG_TINY = math.log(torch.finfo(torch.float32).tiny)  # floor of a student rest that underflowed
LOG_EPS = math.log(2.0**-24)  # floor of p_rest (reverse): 1 - sum p below fp32's resolution


class KDLabels(tuple):
    """(labels (b, s), top-k ids (b, s, k) int64, top-k teacher logits (b, s, k), teacher
    log-sum-exp at the student's T (b, s)).

    A tuple: DeepSpeed's pipeline engine, and ``mtnlg.training.forward.to_device`` for the plain
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


class _SupportLSE(torch.autograd.Function):
    """Shard (b, s, V/tp), support ids (b, s, k) -> the support logits (b, s, k) fp32, LSE_T
    over the real vocabulary (b, s) and LSE_T over its columns outside the support (b, s), -inf
    where there are none. With ``with_rest`` the ``ids`` must be distinct real ids (the top-k
    are); without it (``rest`` then -inf, not computed) they may repeat (sampled ids): the
    support logits, LSE_T and both gradients (repeats' summed) stay exact."""

    @staticmethod
    def forward(ctx, logits, ids, group, temperature, vocab_size, inplace, with_rest=True):
        ctx.input_dtype, ctx.inv_t = logits.dtype, 1.0 / temperature
        vl = logits.shape[-1]
        start = tp_rank(group) * vl
        local = ids - start
        mine = (local >= 0) & (local < vl)  # (b, s, k): the ids this rank owns
        local = local.clamp(0, vl - 1)
        support = logits.gather(-1, local).float().masked_fill_(~mine, 0.0)
        _all_reduce_(support, dist.ReduceOp.SUM, group)  # (b, s, k) on every rank

        own = inplace and logits.dtype == torch.float32 and logits.is_contiguous()
        work = (
            logits
            if own
            else logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        )
        if temperature != 1.0:
            work.mul_(ctx.inv_t)
        if vocab_size is not None and vocab_size < start + vl:  # padding: out of the softmax
            work[..., max(vocab_size - start, 0) :].fill_(float("-inf"))
        m = work.amax(dim=-1)  # (b, s)
        _all_reduce_(m, dist.ReduceOp.MAX, group)
        work.sub_(m.unsqueeze(-1)).exp_()  # e_j = exp(z_j / T - m), kept for backward
        e_sup = work.gather(-1, local).masked_fill_(~mine, 0.0)  # (b, s, k)
        sums = torch.zeros(2, *m.shape, dtype=torch.float32, device=m.device)
        if with_rest:
            work.scatter_add_(-1, local, e_sup.neg())  # support columns: exactly 0
            sums[1] = work.sum(dim=-1)  # the rest: real columns outside the support
            sums[0] = sums[1] + e_sup.sum(dim=-1)  # everything
            work.scatter_add_(-1, local, e_sup)  # restored (0 + e = e)
        else:  # the rest stays 0: log -> -inf, and no gradient through it (c = 0 below)
            sums[0] = work.sum(dim=-1)
        _all_reduce_(sums, dist.ReduceOp.SUM, group)
        total, rest = sums
        ctx.save_for_backward(work, total, rest, local, mine, e_sup)
        return support, m + total.log(), m + rest.log()

    @staticmethod
    def backward(ctx, g_support, g_lse, g_rest):
        # d LSE / dz_j = e_j / total / T; d LSE_rest / dz_j = e_j / rest / T off the support.
        # The saved exponentials become the gradient in place: backward runs once.
        work, total, rest, local, mine, e_sup = ctx.saved_tensors
        a = g_lse / total  # (b, s)
        c = torch.where(rest > 0, g_rest / rest, 0.0)  # an empty rest gets no gradient
        grad = work.mul_(((a + c) * ctx.inv_t).unsqueeze(-1))  # (b, s, V/tp)
        fix = g_support - e_sup * (c * ctx.inv_t).unsqueeze(-1)  # support: its own, no rest
        grad.scatter_add_(-1, local, fix.masked_fill_(~mine, 0.0))
        return grad.to(ctx.input_dtype), None, None, None, None, None, None


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012); -inf at x = 0."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _check(mode: str, temperature: float) -> None:
    if mode not in KD_MODES:
        raise ValueError(f"--kd-loss {mode!r}: choose one of {', '.join(KD_MODES)}")
    if temperature <= 0:
        raise ValueError(f"--kd-temperature must be > 0 (got {temperature})")


def topk_rest_kl(
    student_logits: Tensor,
    ids: Tensor,
    teacher_values: Tensor,
    teacher_lse: Tensor,
    group=None,
    temperature: float = 1.0,
    mode: str = "forward-kl",
    *,
    vocab_size: int | None = None,
    inplace: bool = False,
) -> Tensor:
    """Per-token T²-scaled KL (b, s) over the teacher's top-k ids plus the rest bucket.

    ``student_logits`` (b, s, V/tp) this rank's shard; ``ids``/``teacher_values`` (b, s, k)
    global ids and raw teacher logits; ``teacher_lse`` (b, s) the teacher's log-sum-exp of z/T.
    ``vocab_size``: columns of global id >= it are padding, whatever their value.
    ``inplace``: fp32 student logits the caller no longer reads become the gradient buffer.
    """
    _check(mode, temperature)
    vocab = vocab_size or student_logits.shape[-1] * tp_world_size(group)
    support, lse, lse_rest = _SupportLSE.apply(
        student_logits, ids, group, temperature, vocab_size, inplace
    )
    lq = support / temperature - lse.unsqueeze(-1)  # (b, s, k)
    lq_rest = lse_rest - lse  # (b, s), -inf where the rest is empty
    with torch.no_grad():
        lp = teacher_values.float() / temperature - teacher_lse.float().unsqueeze(-1)
        mass = lp.logsumexp(dim=-1)  # log sum_i p_i, 0 up to the stored values' rounding
        lp = lp - mass.clamp(min=0.0).unsqueeze(-1)  # over 1 by rounding: renormalised
        lp_rest = log1mexp(mass.clamp(max=0.0))
        if ids.shape[-1] >= vocab:  # the support is the whole vocabulary: no rest bucket
            lp_rest = torch.full_like(lp_rest, float("-inf"))
    head = kl_terms(lp, lq, mode)  # (b, s)
    if mode == "forward-kl":  # p_rest (log p_rest - log q_rest), 0 where p_rest = 0
        has = lp_rest > float("-inf")
        lp_r = torch.where(has, lp_rest, 0.0)
        tail = torch.where(has, lp_r.exp() * (lp_r - lq_rest.clamp(min=LOG_TINY)), 0.0)
    else:  # q_rest (log q_rest - log p_rest), 0 where q_rest = 0
        has = lq_rest.detach() > float("-inf")
        lq_r = torch.where(has, lq_rest, 0.0)
        tail = torch.where(has, lq_r.exp() * (lq_r - lp_rest.clamp(min=LOG_EPS)), 0.0)
    return (head + tail) * (temperature * temperature)


def sampled_kl(
    student_logits: Tensor,
    ids: Tensor,
    teacher_values: Tensor,
    teacher_lse: Tensor,
    top_k: int,
    group=None,
    temperature: float = 1.0,
    *,
    vocab_size: int | None = None,
    inplace: bool = False,
) -> Tensor:
    """Per-token T²-scaled unbiased estimate (b, s) of the forward KL from the teacher's top-k1
    and K2 ids sampled from its tail (``ids``/``teacher_values`` (b, s, k1 + K2): the top-k1,
    ``top_k`` of them, then the samples, repeats allowed; a sample of value -inf is no sample).

        KL ≈ sum_head p_i (log p_i - log q_i) + p_rest / K2 sum_j (log p_sj - log q_sj)

    Its student gradient is T (q - p̂), p̂ = p_i on the head and p_rest count_j / K2 on the
    sampled ids: in expectation over the samples (s_j ~ p / p_rest on the tail) the full KL's
    value and gradient. ``teacher_lse``, ``vocab_size`` and ``inplace`` as
    :func:`topk_rest_kl`."""
    _check("forward-kl", temperature)
    k1 = top_k
    support, lse, _ = _SupportLSE.apply(
        student_logits, ids, group, temperature, vocab_size, inplace, False
    )  # no rest: the sampled ids repeat
    lq = support / temperature - lse.unsqueeze(-1)  # (b, s, k1 + K2)
    with torch.no_grad():
        lp = teacher_values.float() / temperature - teacher_lse.float().unsqueeze(-1)
        mass = lp[..., :k1].logsumexp(dim=-1)  # log sum_head p_i; -inf when k1 = 0
        lp_head = lp[..., :k1] - mass.clamp(min=0.0).unsqueeze(-1)  # over 1 by rounding
        p_rest = log1mexp(mass.clamp(max=0.0)).exp().unsqueeze(-1)  # (b, s, 1)
        drawn = torch.isfinite(lp[..., k1:])  # (b, s, K2); -inf: a token without a tail
        per = p_rest / drawn.sum(dim=-1, keepdim=True).clamp(min=1)  # p_rest / K2
        w = torch.cat([lp_head.exp(), torch.where(drawn, per, 0.0)], dim=-1)
        lp = torch.cat([lp_head, torch.where(drawn, lp[..., k1:], 0.0)], dim=-1)
    return (w * (lp - lq)).sum(dim=-1) * (temperature * temperature)


def resolve_cache_loss(loss: str, sampled_k: int, mode: str) -> str:
    """The loss a cache student trains with: ``loss`` (``--cache-kd-loss``) on a top-k cache,
    ``topk-sampled`` (:func:`sampled_kl`) on a cache with sampled ids (``--cache-kd-loss
    topk-renorm`` and ``--kd-loss reverse-kl`` refused there, naming the flags)."""
    if loss not in (*CACHE_KD_LOSSES, "topk-sampled"):
        raise ValueError(f"--cache-kd-loss {loss!r}: choose one of {', '.join(CACHE_KD_LOSSES)}")
    if not sampled_k:
        if loss == "topk-sampled":
            raise ValueError("cache KD loss 'topk-sampled' needs a cache with sampled ids")
        return loss
    if loss == "topk-renorm":
        raise ValueError(
            f"--cache-kd-loss topk-renorm: the teacher cache holds {sampled_k} sampled tail ids "
            "per token (--sampled-k), trained with their unbiased estimator; renormalising on "
            "them would be biased: drop --cache-kd-loss, or use a cache without --sampled-k"
        )
    if mode != "forward-kl":
        raise ValueError(
            f"--kd-loss {mode}: a teacher cache with sampled ids (--sampled-k {sampled_k}) "
            "estimates the forward KL only (ids drawn from the teacher weigh expectations "
            "under the teacher, the reverse KL's are under the student): use --kd-loss "
            "forward-kl, or a cache without --sampled-k"
        )
    return "topk-sampled"


def topk_kl(
    student_logits: Tensor,
    ids: Tensor,
    teacher_values: Tensor,
    group=None,
    temperature: float = 1.0,
    mode: str = "forward-kl",
) -> Tensor:
    """``topk-renorm``: per-token T²-scaled KL (b, s) on the top-k support, both distributions
    renormalised there (the issue-13 loss: no signal about the mass outside the support)."""
    _check(mode, temperature)
    s = gather_support(student_logits, ids, group) / temperature  # (b, s, k)
    log_q = torch.log_softmax(s, dim=-1)
    with torch.no_grad():
        log_p = torch.log_softmax(teacher_values.float() / temperature, dim=-1)
    return kl_terms(log_p, log_q, mode) * (temperature * temperature)


class CacheKDLoss(nn.Module):
    """``alpha * T² KL + (1 - alpha) * CE`` with :class:`KDLabels` (``alpha`` = 1: no CE
    term); plain labels (or a (labels, loss mask) pair, e.g. evaluation): the cross-entropy
    alone, as ``GPTLoss``. ``loss``: ``topk-rest`` (:func:`topk_rest_kl`) or ``topk-renorm``
    (:func:`topk_kl`); a cache with ``sampled_k`` ids per token after its top-k trains with
    :func:`sampled_kl` instead (:func:`resolve_cache_loss`).

    Used as ``GPTModel.loss_fn`` (PP = 1) and as the pipeline's ``loss_fn`` (PP > 1)."""

    def __init__(self, tp_group, vocab_size: int, kd, loss: str = "topk-rest", sampled_k: int = 0):
        super().__init__()
        self.loss = resolve_cache_loss(loss, sampled_k, kd.mode)
        self.tp_group, self.vocab_size, self.kd, self.sampled_k = (
            tp_group,
            vocab_size,
            kd,
            sampled_k,
        )

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
        labels, ids, values, lse = labels
        kd, group = self.kd, self.tp_group
        ce = None
        if kd.alpha < 1.0:  # first: the KL below may overwrite the logits (inplace)
            ce = vocab_parallel_cross_entropy(
                logits, labels, group, vocab_size=self.vocab_size, inplace=inplace and kd.alpha == 0
            ).mean()
        if kd.alpha == 0.0:
            return ce
        if self.loss == "topk-sampled":
            kl = sampled_kl(
                logits, ids, values, lse, ids.shape[-1] - self.sampled_k, group, kd.temperature,
                vocab_size=self.vocab_size, inplace=inplace,
            ).mean()  # fmt: skip
        elif self.loss == "topk-rest":
            kl = topk_rest_kl(
                logits, ids, values, lse, group, kd.temperature, kd.mode,
                vocab_size=self.vocab_size, inplace=inplace,
            ).mean()  # fmt: skip
        else:
            kl = topk_kl(logits, ids, values, group, kd.temperature, kd.mode).mean()
        return kd.alpha * kl if ce is None else kd.alpha * kl + (1.0 - kd.alpha) * ce
