"""The vocab-parallel KL equals a full-logits ``torch.nn.functional.kl_div`` at TP=1, 2 and 4.

Values and student gradients are compared; padding columns are -inf in both logit sets, as
``GPTEmbedding.lm_logits`` produces them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtnlg.distillation.kd_loss import distillation_loss, vocab_parallel_kl
from tests.helpers.dist import run_distributed

B, S, V, PADDED = 2, 3, 13, 16  # true vocabulary 13, padded to 16 (divisible by 1, 2, 4)


def _logits(seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, PADDED, generator=g, dtype=torch.float64) * scale
    x[..., V:] = float("-inf")
    return x.float()


def _labels() -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))


def _reference(temperature: float, mode: str):
    """Per-token KL and the student-logit gradient of its sum, on unpadded full logits."""
    s = _logits(0, 3.0)[..., :V].double().requires_grad_(True)
    t = _logits(1, 3.0)[..., :V].double()
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    if mode == "forward-kl":  # KL(p || q): kl_div(input=log q, target=log p)
        kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    else:
        kl = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    kl = kl * temperature**2
    (kl * _weights()).sum().backward()
    return kl.detach().float(), s.grad.float()


def _weights() -> torch.Tensor:
    return torch.arange(1, B * S + 1, dtype=torch.float64).view(B, S)


def _kl_on_ranks(rank, world_size, temperature, mode):
    import torch.distributed as dist

    group = dist.new_group(list(range(world_size))) if world_size > 1 else None
    shard = PADDED // world_size
    sl = slice(rank * shard, (rank + 1) * shard)
    s = _logits(0, 3.0)[..., sl].clone().requires_grad_(True)
    t = _logits(1, 3.0)[..., sl].clone()
    kl = vocab_parallel_kl(s, t, group, temperature, mode)
    (kl * _weights().float()).sum().backward()
    return kl.detach(), s.grad[..., : max(0, min(shard, V - rank * shard))]


@pytest.mark.parametrize("mode", ["forward-kl", "reverse-kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_tp1_matches_kl_div(mode, temperature):
    ref_kl, ref_grad = _reference(temperature, mode)
    kl, grad = _kl_on_ranks(0, 1, temperature, mode)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(kl).all()


# TP4 forward-KL is slow only (TP4 reverse-KL and TP2 both modes stay in the default run)
@pytest.mark.parametrize(
    "tp,mode",
    [
        (2, "forward-kl"),
        (2, "reverse-kl"),
        pytest.param(4, "forward-kl", marks=pytest.mark.slow),
        (4, "reverse-kl"),
    ],
)
def test_tp_matches_tp1(tp, mode):
    temperature = 2.0
    ref_kl, ref_grad = _reference(temperature, mode)
    one_kl, one_grad = _kl_on_ranks(0, 1, temperature, mode)
    out = run_distributed(
        _kl_on_ranks,
        world_size=tp,
        args=(temperature, mode),
        timeout=120,
        start_method="forkserver",
    )
    grad = torch.cat([g for _, g in out], dim=-1)
    for kl, _ in out:
        torch.testing.assert_close(kl, one_kl, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, one_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_kl_is_zero_for_identical_logits_and_padding_is_safe():
    s = _logits(0, 3.0).requires_grad_(True)
    kl = vocab_parallel_kl(s, s.detach(), None, 1.0, "forward-kl")
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-6)
    kl.sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[..., V:] == 0).all()


def test_vocab_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="vocabularies"):
        vocab_parallel_kl(_logits(0, 1.0), _logits(1, 1.0)[..., :8], None)
    with pytest.raises(ValueError, match="--kd-loss"):
        vocab_parallel_kl(_logits(0, 1.0), _logits(1, 1.0), None, mode="js")


def test_alpha_mixes_kl_and_cross_entropy():
    s, t, y = _logits(0, 1.0), _logits(1, 1.0), _labels()
    loss, ce, kl = distillation_loss(s, t, y, temperature=2.0, alpha=0.3)
    assert loss.item() == pytest.approx(0.3 * kl.item() + 0.7 * ce.item(), rel=1e-6)
    only_ce, ce2, none = distillation_loss(s, None, y, alpha=0.0)
    assert none is None and only_ce.item() == pytest.approx(ce.item())
    ref_ce = F.cross_entropy(s[..., :V].reshape(-1, V), y.reshape(-1))
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-6)
