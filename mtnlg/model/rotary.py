"""Rotary position embeddings (RoPE, Su et al. 2021), as Hugging Face Llama computes them.

The rotated channels are the first ``dim`` of each head (partial rotary when ``dim`` < head
dim), in the "rotate half" pairing (channel i with i + dim/2), which is the layout of Llama,
Mistral and Qwen2 checkpoints and of Megatron-LM's default. Angles are formed in fp32 and the
cos/sin tables cast to the activations' dtype, as ``transformers`` does.
Shapes: b batch, s positions, nh heads, d head dim, r = dim rotated channels.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions: torch.Tensor, dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for ``positions`` (s,) or (b, s) int64 -> (1, 1, s, r) or (b, 1, s, r)."""
    device = positions.device
    inv_freq = 1.0 / (
        base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )  # (r/2,)
    pos = positions.float()
    if pos.dim() == 1:
        pos = pos[None]
    freqs = pos[..., None] * inv_freq  # (b, s, r/2), fp32
    emb = torch.cat((freqs, freqs), dim=-1)  # (b, s, r)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, nh, s, d) rotated on its first r channels; the rest passes through."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)
