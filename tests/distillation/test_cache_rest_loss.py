"""The cache's top-k + rest-bucket KL against dense fp64 references, at TP = 1 and TP = 2.

* k < V: the loss and its gradient w.r.t. the student logits equal a dense fp64 computation
  (full softmax over the vocabulary, the teacher's top-k taken from its dense logits, the rest
  bucket summed densely), forward and reverse KL, T = 1 and 2, with vocabulary padding holding
  junk values the loss must ignore;
* k = V: it equals online KD (``vocab_parallel_kl``; ``distillation_loss`` with the CE mixed
  in by ``--kd-alpha``), values and gradients, so the empty rest bucket adds nothing (no NaN);
* extreme tokens (the teacher's top-k holding all its mass, a student tail underflowing to 0)
  give finite values and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtnlg.distillation.cache_kd_loss import CacheKDLoss, KDLabels, topk_rest_kl
from mtnlg.distillation.kd_loss import distillation_loss, vocab_parallel_kl
from mtnlg.distillation.student import KDConfig
from tests.helpers.dist import run_distributed

B, S, V, PADDED, K = 2, 3, 50, 64, 5  # TP2: rank 1 owns ids 32..63, 50..63 padding
CASES = [(t, m) for t in (1.0, 2.0) for m in ("forward-kl", "reverse-kl")]


def _student() -> torch.Tensor:  # (B, S, PADDED) fp32, padding columns junk (not -inf)
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, S, PADDED, generator=g, dtype=torch.float64) * 3).float()


def _teacher() -> torch.Tensor:  # (B, S, V) fp64 holding fp32 values (the cache's exactly)
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, S, V, generator=g, dtype=torch.float64) * 3).float().double()


def _weights() -> torch.Tensor:
    return torch.arange(1, B * S + 1, dtype=torch.float64).view(B, S)


def _cached(k: int, temperature: float):
    """What the cache holds: sorted top-k ids, their raw logits (fp32), the teacher's LSE_T."""
    t = _teacher()
    ids = t.topk(k, dim=-1).indices.sort(dim=-1).values
    return ids, t.gather(-1, ids).float(), (t / temperature).logsumexp(dim=-1).float()


def _dense_reference(k: int, temperature: float, mode: str):
    """fp64, dense: KL over {top-k ids, rest} of the full softmaxes; its student gradient."""
    s = _student()[..., :V].double().requires_grad_(True)
    lq, lp = F.log_softmax(s / temperature, -1), F.log_softmax(_teacher() / temperature, -1)
    ids = _cached(k, temperature)[0]
    in_k = torch.zeros(B, S, V, dtype=torch.bool).scatter_(-1, ids, True)
    p = torch.cat([lp.gather(-1, ids).exp(), lp.exp().masked_fill(in_k, 0).sum(-1, True)], -1)
    q = torch.cat([lq.gather(-1, ids).exp(), lq.exp().masked_fill(in_k, 0).sum(-1, True)], -1)
    a, b = (p, q) if mode == "forward-kl" else (q, p)
    kl = torch.where(a > 0, a * (a.clamp(min=1e-300).log() - b.log()), 0.0).sum(-1)
    kl = kl * temperature**2
    (kl * _weights()).sum().backward()
    return kl.detach(), s.grad


def _shard(x: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    n = x.shape[-1] // tp
    return x[..., rank * n : (rank + 1) * n].clone()


def _losses(rank: int, tp: int, group) -> dict:
    """Per case: this rank's per-token loss and student-shard gradient, the rest-bucket loss at
    k < V and k = V, online KD at k = V, and the CE-mixed losses of both at k = V."""
    out = {}
    for temperature, mode in CASES:
        for k in (K, V):
            ids, values, lse = _cached(k, temperature)
            z = _shard(_student(), rank, tp).requires_grad_(True)
            kl = topk_rest_kl(z, ids, values, lse, group, temperature, mode, vocab_size=V)
            (kl * _weights().float()).sum().backward()
            out[temperature, mode, k] = (kl.detach(), z.grad)
        z = _shard(_student(), rank, tp).requires_grad_(True)
        t = _shard(F.pad(_teacher(), (0, PADDED - V), value=float("-inf")).float(), rank, tp)
        kl = vocab_parallel_kl(z, t, group, temperature, mode, vocab_size=V)
        (kl * _weights().float()).sum().backward()
        out[temperature, mode, "online"] = (kl.detach(), z.grad)
        labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
        for alpha in (0.7, 1.0):
            z = _shard(_student(), rank, tp).requires_grad_(True)
            loss, *_ = distillation_loss(
                z, t, labels, None, group, temperature=temperature, alpha=alpha, mode=mode,
                vocab_size=V,
            )  # fmt: skip
            loss.backward()
            out[temperature, mode, "online", alpha] = (loss.detach(), z.grad)
            z = _shard(_student(), rank, tp).requires_grad_(True)
            cached = KDLabels((labels, *_cached(V, temperature)))
            loss = CacheKDLoss(group, V, KDConfig(temperature, alpha, mode))(z, cached)
            loss.backward()
            out[temperature, mode, "cache", alpha] = (loss.detach(), z.grad)
    return out


def _on_ranks(rank, world_size):
    import torch.distributed as dist

    return _losses(rank, world_size, dist.new_group(list(range(world_size))))


def _check(per_rank: list[dict], tp: int) -> None:
    n = PADDED // tp
    for temperature, mode in CASES:
        want_kl, want_grad = _dense_reference(K, temperature, mode)
        for rank, out in enumerate(per_rank):
            real = max(0, min(n, V - rank * n))  # the real columns of this rank's shard
            kl, grad = out[temperature, mode, K]
            msg = f"T={temperature} {mode} tp={tp} rank={rank}"
            # fp32 work (the loss ~5, gradients ~1): agreement to fp32's resolution
            torch.testing.assert_close(kl.double(), want_kl, rtol=1e-5, atol=1e-5, msg=msg)
            ref = want_grad[..., rank * n : rank * n + real]
            got = grad[..., :real].double()
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=msg)
            assert (grad[..., real:] == 0).all(), "padding columns must get no gradient"
            full, online = out[temperature, mode, V], out[temperature, mode, "online"]
            torch.testing.assert_close(full[0], online[0], rtol=1e-5, atol=1e-5, msg=msg)
            torch.testing.assert_close(full[1], online[1], rtol=1e-5, atol=1e-5, msg=msg)
            for alpha in (0.7, 1.0):
                got, ref = (
                    out[temperature, mode, "cache", alpha],
                    out[temperature, mode, "online", alpha],
                )
                torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5, msg=msg)
                torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5, msg=msg)


def test_rest_bucket_equals_dense_reference_tp1():
    _check([_losses(0, 1, None)], 1)


@pytest.mark.timeout(180)
def test_rest_bucket_equals_dense_reference_tp2():
    _check(run_distributed(_on_ranks, 2, timeout=150, start_method="forkserver"), 2)


def test_inplace_logits_give_the_same_loss_and_gradient():
    ids, values, lse = _cached(K, 2.0)
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    out = []
    for inplace in (False, True):
        z = _student().requires_grad_(True)
        logits = z * 1.0  # a temporary the loss may overwrite (as the output layer's)
        loss = CacheKDLoss(None, V, KDConfig(2.0, 0.6))(
            logits, KDLabels((labels, ids, values, lse)), inplace=inplace
        )
        loss.backward()
        out.append((loss.detach(), z.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=0)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["forward-kl", "reverse-kl"])
def test_extreme_tokens_stay_finite(mode):
    """Token 0: the teacher's top-k holds all its mass (p_rest = 0); token 1: the student's
    tail underflows (q_rest = 0); token 2: the cached values rounded so that sum p > 1."""
    ids = torch.arange(K).expand(1, 3, K)
    values = torch.zeros(1, 3, K)
    lse = torch.full((1, 3), math.log(K))  # p_i = 1/k each: p_rest = 0
    lse[0, 1] = math.log(2 * K)  # p_rest = 1/2
    lse[0, 2] -= 1e-3  # sum p = e^1e-3 > 1
    z = torch.zeros(1, 3, PADDED)
    z[0, 1, K:] = -1e4  # the student's tail underflows
    z.requires_grad_(True)
    kl = topk_rest_kl(z, ids, values, lse, None, 1.0, mode, vocab_size=V)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(z.grad).all(), (kl, z.grad)
    assert (kl >= -1e-6).all()
