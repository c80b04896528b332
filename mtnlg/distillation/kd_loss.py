"""Knowledge-distillation losses over vocab-parallel logits, without gathering them.

Student and teacher logits arrive as this rank's vocabulary shard (b, s, V/tp); padding columns
are -inf in both (``lm_logits``' default) or, with ``vocab_size``, excluded whatever their
value. Only (b, s)-sized tensors cross TP ranks: the global maxima (one all-reduce MAX), the sums
of exponentials and the CE target logit (one all-reduce SUM) and the KL partial sums (one
all-reduce SUM).

With temperature T and tempered distributions p = softmax(z_teacher / T), q = softmax(z_student
/ T), the per-token terms are scaled by T² (Hinton et al. 2015) so gradient magnitudes do not
shrink with T:

* ``forward-kl``: T² KL(p || q) = T² sum_v p (log p - log q)   (mass-covering, DistilBERT's)
* ``reverse-kl``: T² KL(q || p) = T² sum_v q (log q - log p)   (mode-seeking, MiniLLM's)

Gradients, in closed form (u = z_student / T, d log q_j / d u_i = δ_ij - q_i):

* forward: d KL(p||q) / d u = q - p, so d [T² KL] / d z_student = T (q - p)
* reverse: d KL(q||p) / d u_i = sum_j q_j (log q_j - log p_j + 1)(δ_ij - q_i)
  = q_i (log q_i - log p_i - KL(q||p)), so d [T² KL] / d z_student = T q (log q - log p - KL)
* cross-entropy (T = 1): d CE / d z = softmax(z) - onehot(label)

Memory: :class:`_FusedKD` walks the rows (tokens) in chunks of about ``_CHUNK_ELEMS`` values,
so its only (b, s, V/tp) buffer is the gradient of the combined loss, computed in the forward
and scaled in place by the upstream (b, s) gradient in the backward (as Megatron's CE). With
``inplace=True`` (fp32 logits the caller no longer needs) that buffer is the student logits
themselves: no (b, s, V/tp) temporary at all. The teacher logits are only read.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mtnlg.tensor_parallel.cross_entropy import _all_reduce_, vocab_parallel_cross_entropy
from mtnlg.tensor_parallel.mappings import tp_rank

KD_MODES = ("forward-kl", "reverse-kl")

# Stand-in for -inf (padding columns): exp() of it is exactly 0, and differences of two of them
# are 0, so 0 * log 0 terms vanish without NaNs in values or gradients.
_NEG = torch.finfo(torch.float32).min / 4
_CHUNK_ELEMS = 1 << 20  # values per row chunk: the per-chunk temporaries stay ~4 MB each


def _prep(x: Tensor, scale: float, pad_from: int) -> Tensor:
    """Chunk (n, V/tp) -> fp32 copy times ``scale``, padding / -inf columns set to _NEG."""
    y = x.float() * scale  # always a fresh chunk-sized tensor
    y[:, pad_from:] = _NEG
    return y.clamp_(min=_NEG)


class _FusedKD(torch.autograd.Function):
    """Per-token ``alpha T² KL + (1 - alpha) CE`` (b, s) and its detached CE and KL terms.

    ``target`` None: no CE (the loss is T² KL, ``alpha`` must be 1). ``alpha`` > 0.
    """

    @staticmethod
    def forward(
        ctx, student, teacher, target, group, temperature, mode, alpha, vocab_size, inplace
    ):
        ctx.input_dtype = student.dtype
        shape, vl = student.shape[:-1], student.shape[-1]
        z, tz = student.reshape(-1, vl), teacher.reshape(-1, vl)  # (n, V/tp), n = b*s
        n, dev = z.shape[0], z.device
        start = tp_rank(group) * vl
        pad_from = vl if vocab_size is None else min(max(vocab_size - start, 0), vl)
        own = inplace and student.dtype == torch.float32 and student.is_contiguous()
        need = ctx.needs_input_grad[0]  # no (b, s, V/tp) buffer at all without a gradient
        grad = z if own or not need else torch.empty(n, vl, dtype=torch.float32, device=dev)
        inv_t, use_ce = 1.0 / temperature, target is not None
        if use_ce:
            outside = ((target < start) | (target >= start + vl)).reshape(-1)  # (n,)
            local_t = (target.reshape(-1) - start).masked_fill(outside, 0).unsqueeze(-1)
        step = max(1, _CHUNK_ELEMS // max(vl, 1))
        chunks = [slice(i, min(i + step, n)) for i in range(0, n, step)]

        stats = torch.zeros(3, n, dtype=torch.float32, device=dev)  # maxima of s/T, t/T, s
        for r in chunks:
            stats[0, r] = _prep(z[r], inv_t, pad_from).amax(-1)
            stats[1, r] = _prep(tz[r], inv_t, pad_from).amax(-1)
            if use_ce:
                stats[2, r] = _prep(z[r], 1.0, pad_from).amax(-1)
        _all_reduce_(stats, dist.ReduceOp.MAX, group)
        m_s, m_t, m_1 = stats.unsqueeze(-1)  # (n, 1) each

        sums = torch.zeros(4, n, dtype=torch.float32, device=dev)  # Z_s, Z_t, Z_1, z[target]
        for r in chunks:
            sums[0, r] = _prep(z[r], inv_t, pad_from).sub_(m_s[r]).exp_().sum(-1)
            sums[1, r] = _prep(tz[r], inv_t, pad_from).sub_(m_t[r]).exp_().sum(-1)
            if use_ce:
                zc = _prep(z[r], 1.0, pad_from)
                sums[3, r] = zc.gather(-1, local_t[r]).squeeze(-1)
                sums[2, r] = zc.sub_(m_1[r]).exp_().sum(-1)
        if use_ce:
            sums[3].masked_fill_(outside, 0.0)
        _all_reduce_(sums, dist.ReduceOp.SUM, group)
        lz_s, lz_t, lz_1 = sums[:3].log().unsqueeze(-1)  # (n, 1): log sum exp(x - max)

        def log_qp(r):  # log q, log p on rows r: (rows, V/tp) each
            lq = _prep(z[r], inv_t, pad_from).sub_(m_s[r]).sub_(lz_s[r])
            return lq, _prep(tz[r], inv_t, pad_from).sub_(m_t[r]).sub_(lz_t[r])

        def write_grad(r, kd_grad):  # + (1 - alpha) (softmax(z) - onehot), then into the buffer
            if not need:
                return
            kd_grad.mul_(alpha * temperature)
            if use_ce and alpha < 1.0:
                sm = _prep(z[r], 1.0, pad_from).sub_(m_1[r]).exp_()
                sm.div_(sums[2, r].unsqueeze(-1))
                sm.scatter_add_(-1, local_t[r], (~outside[r]).float().neg_().unsqueeze(-1))
                kd_grad.add_(sm.mul_(1.0 - alpha))
            grad[r] = kd_grad  # reads of z[r] are done: the rows may be the student's own

        kl = torch.empty(n, dtype=torch.float32, device=dev)
        for r in chunks:  # KL partial sums (and forward KL's gradient T (q - p))
            lq, lp = log_qp(r)
            if mode == "forward-kl":
                p = lp.exp()
                kl[r] = (p * (lp - lq)).sum(-1)
                write_grad(r, lq.exp_().sub_(p))
            else:
                kl[r] = (lq.exp() * (lq - lp)).sum(-1)
        _all_reduce_(kl, dist.ReduceOp.SUM, group)
        if mode == "reverse-kl" and need:  # T q (log q - log p - KL) needs the full KL first
            for r in chunks:
                lq, lp = log_qp(r)
                write_grad(r, lq.sub(lp).sub_(kl[r].unsqueeze(-1)).mul_(lq.exp_()))

        kl = kl.mul_(temperature * temperature).view(shape)
        ce = (
            (m_1 + lz_1 - sums[3].unsqueeze(-1)).squeeze(-1).view(shape)
            if use_ce
            else torch.zeros_like(kl)
        )
        loss = alpha * kl + (1.0 - alpha) * ce if use_ce and alpha < 1.0 else kl.clone()
        ctx.save_for_backward(
            student if own or not need else grad
        )  # not a view made here: autograd
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        # The saved gradient is scaled in place (no second buffer): backward runs once.
        (grad,) = ctx.saved_tensors
        g = grad_loss.to(torch.float32).unsqueeze(-1)  # (b, s, 1)
        grad = grad.view(*grad_loss.shape, -1).mul_(g).to(ctx.input_dtype)
        return grad, None, None, None, None, None, None, None, None


def _check(student_logits: Tensor, teacher_logits: Tensor, temperature: float, mode: str) -> None:
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


def vocab_parallel_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    group=None,
    temperature: float = 1.0,
    mode: str = "forward-kl",
    *,
    vocab_size: int | None = None,
    inplace: bool = False,
) -> Tensor:
    """Per-token T²-scaled KL (b, s) from vocab-parallel logit shards (b, s, V/tp).

    ``mode`` is ``forward-kl`` (KL(teacher || student)) or ``reverse-kl`` (KL(student ||
    teacher)). Computed in fp32 whatever the logits' dtype; the teacher gets no gradient.
    Shards must have equal shapes (same vocabulary, same padding, same TP degree).
    ``vocab_size``: columns of global id >= it are padding, whatever their value.
    ``inplace``: fp32 student logits the caller no longer reads become the gradient buffer.
    """
    _check(student_logits, teacher_logits, temperature, mode)
    args = (group, temperature, mode, 1.0, vocab_size, inplace)
    return _FusedKD.apply(student_logits, teacher_logits.detach(), None, *args)[0]


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
    vocab_size: int | None = None,
    inplace: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``alpha * mean(T² KL) + (1 - alpha) * mean(CE)``; returns (loss, ce, kl) scalars.

    ``teacher_logits`` may be None only when ``alpha == 0`` (cross-entropy alone). KL and CE
    share one fused pass (:class:`_FusedKD`) and one (b, s, V/tp) gradient buffer;
    ``vocab_size`` and ``inplace`` as in :func:`vocab_parallel_kl`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--kd-alpha must be in [0, 1] (got {alpha})")
    if alpha == 0.0:
        ce_tok = vocab_parallel_cross_entropy(
            student_logits, labels, group, vocab_size=vocab_size, inplace=inplace
        )
        ce = _masked_mean(ce_tok, loss_mask)
        return ce, ce.detach(), None
    if teacher_logits is None:
        raise ValueError("teacher logits are required when --kd-alpha > 0")
    _check(student_logits, teacher_logits, temperature, mode)
    loss, ce, kl = _FusedKD.apply(
        student_logits,
        teacher_logits.detach(),
        labels,
        group,
        temperature,
        mode,
        alpha,
        vocab_size,
        inplace,
    )
    return tuple(_masked_mean(x, loss_mask) for x in (loss, ce, kl))
