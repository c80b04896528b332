"""The sampled-tail cache loss (``cache_kd_loss.sampled_kl``): exact as an estimator, unbiased.

* Given the ids, the loss and its student gradient equal the same estimator formed densely in
  fp64 from the dense teacher / student logits (full log-softmaxes, the head's mass summed
  densely) at TP = 1 and 2 (gloo), T = 1 and 2, with junk in the vocabulary padding, repeated
  sampled ids, a token without samples (values -inf: weight 0) and one with some; with k1 = 0
  (pure sampling) too; ``CacheKDLoss`` mixes in the CE by ``--kd-alpha`` as the dense mix.
* k1 = V (every id in the head, the samples empty): it is online KD (``vocab_parallel_kl``).
* Averaged over 2,000 caches drawn by the writer's own sampler (``vocab_parallel_sample``),
  value and gradient converge to the full-vocabulary forward KL and its gradient.
* Reverse KL and ``--cache-kd-loss topk-renorm`` are refused with a sampled cache.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtnlg.distillation.cache_kd_loss import (
    CacheKDLoss,
    KDLabels,
    resolve_cache_loss,
    sampled_kl,
    topk_rest_kl,
)
from mtnlg.distillation.cache_write import vocab_parallel_sample
from mtnlg.distillation.kd_loss import vocab_parallel_kl
from mtnlg.distillation.student import KDConfig
from tests.helpers.dist import run_distributed

B, S, V, PADDED, K1, K2 = 2, 3, 50, 64, 5, 6  # TP2: rank 1 owns ids 32..63, 50..63 padding
CASES = [(t, k1) for t in (1.0, 2.0) for k1 in (K1, 0)]


def _student() -> torch.Tensor:  # (B, S, PADDED) fp32, padding columns junk (not -inf)
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, S, PADDED, generator=g, dtype=torch.float64) * 3).float()


def _teacher() -> torch.Tensor:  # (B, S, V) fp64 holding fp32 values (the cache's exactly)
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2).float().double()


def _weights() -> torch.Tensor:
    return torch.arange(1, B * S + 1, dtype=torch.float64).view(B, S)


def _cached(k1: int, temperature: float):
    """A sampled cache's entries: top-k1 ids (sorted), then K2 tail ids drawn by hand from 4
    tail ids per token (so they repeat), their raw logits, the teacher's LSE_T. Token (1, 2)
    has no samples (-inf: a tail-less token), token (0, 1) two of six missing."""
    t = _teacher()
    head = t.topk(k1, dim=-1).indices.sort(dim=-1).values  # (B, S, k1)
    g = torch.Generator().manual_seed(3)
    tail = torch.rand(B, S, V, generator=g).scatter(-1, head, -1.0).argsort(-1, descending=True)
    pick = torch.randint(0, 4, (B, S, K2), generator=g)
    ids = torch.cat([head, tail.gather(-1, pick)], dim=-1)  # (B, S, k1 + K2)
    values = t.gather(-1, ids).float()
    values[1, 2, k1:] = float("-inf")
    ids[1, 2, k1:] = 0
    values[0, 1, k1 : k1 + 2] = float("-inf")
    return ids, values, (t / temperature).logsumexp(dim=-1).float()


def _dense(k1: int, temperature: float):
    """fp64: the estimator formed from the dense log-softmaxes; (per-token loss, gradient)."""
    s = _student()[..., :V].double().requires_grad_(True)
    lq, lp = F.log_softmax(s / temperature, -1), F.log_softmax(_teacher() / temperature, -1)
    ids, values, _ = _cached(k1, temperature)
    head, smp = ids[..., :k1], ids[..., k1:]
    p_head = lp.gather(-1, head).exp()
    p_rest = 1.0 - p_head.sum(-1, keepdim=True)
    drawn = torch.isfinite(values[..., k1:])
    per = torch.where(drawn, p_rest / drawn.sum(-1, keepdim=True).clamp(min=1), 0.0)
    est = (p_head * (lp.gather(-1, head) - lq.gather(-1, head))).sum(-1)
    est = est + (per * (lp.gather(-1, smp) - lq.gather(-1, smp))).sum(-1)
    est = est * temperature**2
    (est * _weights()).sum().backward()
    return est.detach(), s.grad


def _labels() -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))


def _dense_mixed(alpha: float, temperature: float):
    """alpha * mean(estimator) + (1 - alpha) * mean(CE), fp64, and its gradient."""
    s = _student()[..., :V].double().requires_grad_(True)
    lq, lp = F.log_softmax(s / temperature, -1), F.log_softmax(_teacher() / temperature, -1)
    ids, values, _ = _cached(K1, temperature)
    p_head = lp.gather(-1, ids[..., :K1]).exp()
    drawn = torch.isfinite(values[..., K1:])
    per = (1.0 - p_head.sum(-1, keepdim=True)) / drawn.sum(-1, keepdim=True).clamp(min=1)
    w = torch.cat([p_head, torch.where(drawn, per, 0.0)], -1)
    est = (w * (lp.gather(-1, ids) - lq.gather(-1, ids))).sum(-1) * temperature**2
    ce = F.cross_entropy(s.reshape(-1, V), _labels().reshape(-1), reduction="none")
    loss = alpha * est.mean() + (1 - alpha) * ce.mean()
    loss.backward()
    return loss.detach(), s.grad


def _shard(x: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    n = x.shape[-1] // tp
    return x[..., rank * n : (rank + 1) * n].clone()


def _losses(rank: int, tp: int, group) -> dict:
    out = {}
    for temperature, k1 in CASES:
        ids, values, lse = _cached(k1, temperature)
        z = _shard(_student(), rank, tp).requires_grad_(True)
        kl = sampled_kl(z, ids, values, lse, k1, group, temperature, vocab_size=V)
        (kl * _weights().float()).sum().backward()
        out[temperature, k1] = (kl.detach(), z.grad)
        z = _shard(_student(), rank, tp).requires_grad_(True)
        kd = KDConfig(temperature, 0.7)
        loss = CacheKDLoss(group, V, kd, sampled_k=K2)(
            z, KDLabels((_labels(), *_cached(K1, temperature)))
        )
        loss.backward()
        out[temperature, "mixed"] = (loss.detach(), z.grad)
    # k1 = V: the head is the vocabulary, the samples empty (as the writer stores them)
    t = _teacher()
    ids = torch.cat([torch.arange(V).expand(B, S, V), torch.zeros(B, S, K2, dtype=torch.long)], -1)
    values = torch.cat([t.float(), torch.full((B, S, K2), float("-inf"))], -1)
    z = _shard(_student(), rank, tp).requires_grad_(True)
    kl = sampled_kl(z, ids, values, (t / 2.0).logsumexp(-1).float(), V, group, 2.0, vocab_size=V)
    (kl * _weights().float()).sum().backward()
    out["full"] = (kl.detach(), z.grad)
    z = _shard(_student(), rank, tp).requires_grad_(True)
    tz = _shard(F.pad(t, (0, PADDED - V), value=float("-inf")).float(), rank, tp)
    kl = vocab_parallel_kl(z, tz, group, 2.0, vocab_size=V)
    (kl * _weights().float()).sum().backward()
    out["online"] = (kl.detach(), z.grad)
    return out


def _on_ranks(rank, world_size):
    import torch.distributed as dist

    return _losses(rank, world_size, dist.new_group(list(range(world_size))))


def _check(per_rank: list[dict], tp: int) -> None:
    n = PADDED // tp
    for rank, out in enumerate(per_rank):
        real = max(0, min(n, V - rank * n))  # the real columns of this rank's shard
        cols = slice(rank * n, rank * n + real)
        for temperature, k1 in CASES:
            want_kl, want_grad = _dense(k1, temperature)
            kl, grad = out[temperature, k1]
            msg = f"T={temperature} k1={k1} tp={tp} rank={rank}"
            assert torch.isfinite(kl).all() and torch.isfinite(grad).all(), msg
            # fp32 work (the loss ~5, gradients ~1): agreement to fp32's resolution
            torch.testing.assert_close(kl.double(), want_kl, rtol=1e-5, atol=1e-5, msg=msg)
            got = grad[..., :real].double()
            torch.testing.assert_close(got, want_grad[..., cols], rtol=1e-5, atol=1e-5, msg=msg)
            assert (grad[..., real:] == 0).all(), "padding columns must get no gradient"
            want_loss, want_grad = _dense_mixed(0.7, temperature)
            loss, grad = out[temperature, "mixed"]
            torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5, msg=msg)
            got = grad[..., :real].double()
            torch.testing.assert_close(got, want_grad[..., cols], rtol=1e-5, atol=1e-5, msg=msg)
        for i in (0, 1):
            torch.testing.assert_close(out["full"][i], out["online"][i], rtol=1e-5, atol=1e-5)


def test_sampled_loss_equals_dense_estimator_tp1():
    _check([_losses(0, 1, None)], 1)


@pytest.mark.timeout(180)
def test_sampled_loss_equals_dense_estimator_tp2():
    _check(run_distributed(_on_ranks, 2, timeout=150, start_method="forkserver"), 2)


def test_sampled_loss_is_unbiased_over_drawn_caches():
    """N = 2,000 caches of one 2-token sample, drawn by the writer's sampler (k1 = 4, K2 = 4,
    T = 1). Each draw's value and gradient are unbiased, so their means lie within 5 standard
    errors of the exact forward KL and its gradient. The standard errors are exact, from the
    dense teacher: a draw's value is the head's term + p_rest / K2 sum_j f(s_j) (f = log p -
    log q, s_j ~ pi = p / p_rest on the tail), of variance p_rest² Var_pi(f) / K2; its gradient
    on a tail id v is q_v - p_rest c_v / K2 (c_v ~ Binomial(K2, pi_v)), of variance
    p_v (p_rest - p_v) / K2, and exact on the head; each divided by N for the mean (a 5-sigma
    bound per element: about 1e-4 chance that one of the 100 compared is outside by chance; the
    draws are seeded, so the test is deterministic). The bound is tight enough to see a bias:
    the top-k + rest bucket's value and gradient fall outside it."""
    n, s, k1, k2 = 2000, 2, 4, 4
    g = torch.Generator().manual_seed(5)
    teacher = F.pad(torch.randn(1, s, V, generator=g) * 2, (0, PADDED - V), value=float("-inf"))
    student = torch.randn(1, s, PADDED, generator=g) * 2
    head_v, head = teacher[..., :V].topk(k1, dim=-1)
    lse = teacher[..., :V].logsumexp(-1)
    sv, sid = vocab_parallel_sample(
        teacher.expand(n, s, PADDED), head.expand(n, s, k1), k2, 1.0, range(n), 7, vocab_size=V
    )
    ids = torch.cat([head.expand(n, s, k1), sid], -1)
    values = torch.cat([head_v.expand(n, s, k1), sv], -1)
    z = student.expand(n, s, PADDED).clone().requires_grad_(True)
    kl = sampled_kl(z, ids, values, lse.expand(n, s), k1, vocab_size=V)
    kl.sum().backward()
    zt = student.clone().requires_grad_(True)
    exact = vocab_parallel_kl(zt, teacher, vocab_size=V)
    exact.sum().backward()
    zr = student.clone().requires_grad_(True)
    rest = topk_rest_kl(zr, head, head_v, lse, vocab_size=V)  # deterministic, biased
    rest.sum().backward()

    lp = F.log_softmax(teacher[0, :, :V].double(), -1)  # (s, V) dense, exact
    f = lp - F.log_softmax(student[0, :, :V].double(), -1)
    p = lp.exp().scatter(-1, head[0], 0.0)  # the tail's p_v, 0 on the head
    p_rest = p.sum(-1, keepdim=True)
    pi = p / p_rest
    var_f = (pi * f**2).sum(-1) - (pi * f).sum(-1) ** 2
    sd_value = p_rest[:, 0] * (var_f / k2).sqrt()  # (s,)
    sd_grad = (p * (p_rest - p) / k2).sqrt()  # (s, V)
    for draws, want, biased, sd in [
        (kl.detach(), exact.detach()[0], rest.detach()[0], sd_value),
        (z.grad[..., :V], zt.grad[0, :, :V], zr.grad[0, :, :V], sd_grad),
    ]:
        mean, tol = draws.double().mean(0), 5 * sd / n**0.5 + 1e-6  # + fp32 rounding
        err = (mean - want.double()).abs()
        assert (err <= tol).all(), (err / tol).max()
        assert ((biased.double() - want.double()).abs() > tol).any(), "the bound sees no bias"


def test_sampled_cache_refuses_reverse_kl_and_renorm():
    assert resolve_cache_loss("topk-rest", 8, "forward-kl") == "topk-sampled"
    assert resolve_cache_loss("topk-renorm", 0, "reverse-kl") == "topk-renorm"
    with pytest.raises(ValueError, match="--kd-loss reverse-kl: a teacher cache with sampled"):
        resolve_cache_loss("topk-rest", 8, "reverse-kl")
    with pytest.raises(ValueError, match="--cache-kd-loss topk-renorm: the teacher cache holds"):
        resolve_cache_loss("topk-renorm", 8, "forward-kl")
    with pytest.raises(ValueError, match="--kd-loss reverse-kl"):
        CacheKDLoss(None, V, KDConfig(1.0, 1.0, "reverse-kl"), sampled_k=4)
