"""``sample`` draws from the distribution it claims: frequencies against softmax by hand."""

from __future__ import annotations

import pytest
import torch

from mtnlg.inference.params import SamplingParams
from mtnlg.inference.sampling import sample

LOGITS = torch.tensor([2.0, 1.5, 0.3, 0.2, -1.0])
N = 20000


def _freqs(params: SamplingParams) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(i) for i in range(N)]
    toks = sample(LOGITS.expand(N, -1), [params] * N, gens)
    return torch.bincount(toks, minlength=len(LOGITS)).float() / N


def _expected(keep: list[int], temperature: float = 1.0) -> torch.Tensor:
    p = torch.zeros(len(LOGITS))
    e = [float(torch.exp(LOGITS[i] / temperature)) for i in keep]
    for i, v in zip(keep, e):
        p[i] = v / sum(e)
    return p


@pytest.mark.parametrize(
    "params,keep",
    [
        (SamplingParams(temperature=1.0), [0, 1, 2, 3, 4]),
        (SamplingParams(temperature=0.5), [0, 1, 2, 3, 4]),
        (SamplingParams(top_k=2), [0, 1]),
        # softmax: 0.487, 0.295, 0.089, 0.080, 0.024 -> the first two reach 0.7
        (SamplingParams(top_p=0.7), [0, 1]),
        (SamplingParams(top_p=0.85, top_k=4), [0, 1, 2]),
    ],
)
def test_frequencies_match_filtered_softmax(params, keep):
    want = _expected(keep, params.temperature)
    torch.testing.assert_close(_freqs(params), want, rtol=0, atol=0.015)


def test_greedy_and_degenerate_filters_are_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(-1)
    for p in (SamplingParams(greedy=True), SamplingParams(temperature=0.0)):
        assert torch.equal(sample(logits, [p] * 6, [torch.Generator()] * 6), argmax)
    for p in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6)):
        gens = [torch.Generator().manual_seed(i) for i in range(6)]
        assert torch.equal(sample(logits, [p] * 6, gens), argmax)


def test_row_draw_depends_on_its_generator_only():
    """A row gives the same token alone and beside other rows (greedy or sampled)."""
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.3)
    for seed in range(20):
        gens = [
            torch.Generator(),
            torch.Generator().manual_seed(99),
            torch.Generator().manual_seed(seed),
        ]
        together = sample(logits, [SamplingParams(greedy=True), p, p], gens)
        alone = sample(logits[2:], [p], [torch.Generator().manual_seed(seed)])
        assert together[2] == alone[0]
        assert together[0] == logits[0].argmax()
