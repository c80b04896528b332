"""Next-token choice on full-vocabulary rows: greedy, temperature, top-k, top-p.

Randomness comes from one CPU ``torch.Generator`` per request, seeded by the request: one uniform
number per step, turned into a token by the inverse CDF of the (sorted, filtered) distribution.
The same seed therefore gives the same tokens on any device, batch and TP x PP layout (up to
logits that differ by rounding right at a CDF boundary).

Numerics: rows are handled in float32 as ``(logits - max) / T`` with T >= ``MIN_TEMPERATURE``
(smaller temperatures are greedy), so every scaled logit is <= 0 with the best one exactly 0:
the softmax can neither overflow nor lose its whole mass. The top-k and top-p masks always keep
the best token. A row that is not usable (a NaN, a +inf, or no finite entry) gets the token
:data:`INVALID` instead of an index: the caller ends that request with an error, never indexes
with it.
"""

from __future__ import annotations

import torch

from mtnlg.inference.params import MIN_TEMPERATURE, SamplingParams

INVALID = -1
"""The token returned for a row whose logits are not usable."""


def usable_rows(logits: torch.Tensor) -> torch.Tensor:
    """(b,) bool: no NaN, no +inf, and at least one finite logit (-inf entries are fine)."""
    bad = torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1)
    return ~bad & torch.isfinite(logits).any(dim=-1)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> torch.Tensor:
    """logits (b, V) of the real vocabulary (no padding columns) -> next tokens (b,) int64;
    :data:`INVALID` for a row that :func:`usable_rows` refuses."""
    b, vocab = logits.shape
    logits = logits.float()
    ok = usable_rows(logits)  # (b,)
    # unusable rows become all zeros: every step below stays finite, their token is replaced
    logits = torch.where(ok[:, None], logits, torch.zeros_like(logits))
    out = logits.argmax(dim=-1)  # (b,) greedy for every row; sampled rows overwritten below
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if rows:
        out[rows] = _draw(logits[rows], [params[i] for i in rows], [generators[i] for i in rows])
    return torch.where(ok, out, torch.full_like(out, INVALID))


def _draw(logits: torch.Tensor, params: list[SamplingParams], gens) -> torch.Tensor:
    """Usable rows (r, V) float32 -> one drawn token per row (r,)."""
    r, vocab = logits.shape
    dev = logits.device
    temp = torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in params], device=dev)
    top_k = torch.tensor([min(p.top_k, vocab) or vocab for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    # one uniform per sampled row, from that request's own generator (CPU: device-agnostic)
    u = torch.cat([torch.rand(1, generator=g) for g in gens]).to(dev)  # (r,)

    best = logits.max(dim=-1, keepdim=True).values  # finite for a usable row
    scaled = (logits - best) / temp[:, None]  # (r, V) in [-inf, 0], the best exactly 0
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits, dim=-1)  # (r, V) in decreasing order, probs[:, 0] > 0
    rank = torch.arange(vocab, device=dev)[None, :]
    keep = rank < top_k[:, None]
    keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None]
    keep[:, 0] = True  # whatever the filters: the best token survives
    probs = probs * keep
    cdf = probs.cumsum(dim=-1)  # (r, V), cdf[:, -1] >= probs[:, 0] > 0
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # (r, 1)
    # never land past the kept tokens (rounding at the top of the CDF)
    pick = torch.minimum(pick, keep.sum(dim=-1, keepdim=True) - 1).clamp(min=0)
    return order.gather(1, pick).squeeze(1)
