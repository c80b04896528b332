"""Next-token choice on full-vocabulary rows: greedy, temperature, top-k, top-p.

Randomness comes from one CPU ``torch.Generator`` per request, seeded by the request: one uniform
number per step, turned into a token by the inverse CDF of the (sorted, filtered) distribution.
The same seed therefore gives the same tokens on any device, batch and TP x PP layout (up to
logits that differ by rounding right at a CDF boundary).
"""

from __future__ import annotations

import torch

from mtnlg.inference.params import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> torch.Tensor:
    """logits (b, V) of the real vocabulary (no padding columns) -> next tokens (b,) int64."""
    b, vocab = logits.shape
    logits = logits.float()
    out = logits.argmax(dim=-1)  # (b,) greedy for every row; sampled rows overwritten below
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not rows:
        return out
    dev = logits.device
    sel = torch.tensor(rows, device=dev)
    temp = torch.tensor([params[i].temperature for i in rows], device=dev)
    top_k = torch.tensor([params[i].top_k or vocab for i in rows], device=dev)
    top_p = torch.tensor([params[i].top_p for i in rows], device=dev)
    # one uniform per sampled row, from that request's own generator (CPU: device-agnostic)
    u = torch.cat([torch.rand(1, generator=generators[i]) for i in rows]).to(dev)  # (r,)

    scaled = logits[sel] / temp[:, None]  # (r, V)
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits, dim=-1)  # (r, V) in decreasing order
    rank = torch.arange(vocab, device=dev)[None, :]
    keep = rank < top_k[:, None]
    keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None]  # the first token is always kept
    probs = probs * keep
    cdf = probs.cumsum(dim=-1)  # (r, V)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # (r, 1)
    pick = pick.clamp(max=vocab - 1)
    # never land on a filtered (zero-probability) tail position through rounding
    pick = torch.minimum(pick, keep.sum(dim=-1, keepdim=True) - 1)
    out[sel] = order.gather(1, pick).squeeze(1)
    return out
