"""The fused bias-GeLU / bias-dropout-add path against the unfused one (which is the code the
model always ran): one transformer block, forward and backward, same seed.

``aot_eager`` (graph capture + AOTAutograd, no code generation) runs in the default suite and
must give identical bits; inductor's generated C++ kernels (the fusion a GPU run uses, here on
the CPU) are ``slow`` and must agree to fp32 rounding, dropout masks included.
"""

from __future__ import annotations

import pytest
import torch

from mtnlg.config import ModelConfig
from mtnlg.model import fused

CFG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8,
                  vocab_size=64, hidden_dropout=0.1, attention_dropout=0.0)  # fmt: skip


def _run(gelu: bool, dropout: bool, backend: str = "inductor"):
    from mtnlg.model.layers import TransformerBlock

    fused.set_fusion(gelu, dropout, backend)
    try:
        torch.manual_seed(0)
        block = TransformerBlock(CFG)
        for p in block.parameters():  # biases away from zero so a dropped bias would show
            torch.nn.init.normal_(p, std=0.2)
        x = torch.randn(2, CFG.seq_length, CFG.hidden_size, requires_grad=True)
        torch.manual_seed(1)  # the dropout masks
        y = block(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}
    finally:
        fused.set_fusion(False, False)


def _compare(got, want, exact: bool):
    check = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    assert check(got[0], want[0]) and check(got[1], want[1])
    for n in want[2]:
        assert check(got[2][n], want[2][n]), n


def test_fused_graphs_equal_unfused_bit_for_bit():
    want = _run(False, False)
    assert fused.fusion_enabled() == (False, False)
    _compare(_run(True, True, "aot_eager"), want, exact=True)


def test_fusion_is_off_on_the_cpu_by_default():
    fused.default_fusion()
    assert fused.fusion_enabled() == (False, False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_inductor_kernels_match_unfused():
    want = _run(False, False)
    _compare(_run(True, True, "inductor"), want, exact=False)
