"""Rotary position embeddings (RoPE, Su et al. 2021), as Hugging Face Llama computes them.

The rotated channels are the first ``dim`` of each head (partial rotary when ``dim`` < head
dim), in the "rotate half" pairing (channel i with i + dim/2), which is the layout of Llama,
Mistral and Qwen2 checkpoints and of Megatron-LM's default. Angles are formed in fp32 and the
cos/sin tables cast to the activations' dtype, as ``transformers`` does.

RoPE scaling (``ModelConfig.rope_scaling``, transformers 5's ``rope_parameters`` less
``rope_theta``): ``linear``, ``dynamic`` (NTK), ``llama3`` and ``yarn``, computed as
``transformers.modeling_rope_utils`` computes them (docs/llama.md).
Shapes: b batch, s positions, nh heads, d head dim, r = dim rotated channels.
"""

from __future__ import annotations

import math

import torch

ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3", "yarn")
# per type: (required keys, optional keys) of the scaling dict (transformers 5's names)
ROPE_SCALING_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "llama3": (
        ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
        (),
    ),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
}


def check_rope_scaling(scaling: dict | None) -> None:
    """Raise ValueError unless ``scaling`` is None or a complete dict of a supported type."""
    if scaling is None:
        return
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_scaling rope_type {kind!r}: choose one of {ROPE_SCALING_TYPES}")
    required, optional = ROPE_SCALING_KEYS[kind]
    # yarn's factor may be None (transformers then takes max_position_embeddings / original)
    may_be_none = {"factor"} if kind == "yarn" else set()
    missing = [
        k for k in required if scaling.get(k) is None and (k not in may_be_none or k not in scaling)
    ]
    unknown = sorted(set(scaling) - {"rope_type", *required, *optional})
    if missing or unknown:
        raise ValueError(
            f"rope_scaling {kind}: missing {missing or 'nothing'}, unknown keys {unknown or 'none'}"
        )


def _plain_inv_freq(dim: int, base, device) -> torch.Tensor:
    exps = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exps)  # (r/2,) fp32


def rope_inv_freq(
    dim: int,
    base: float,
    scaling: dict | None = None,
    max_position_embeddings: int | None = None,
    seq_len: int | None = None,
    device=None,
) -> tuple[torch.Tensor, float]:
    """(inv_freq (r/2,) fp32, attention factor) as ``transformers`` 5's ``ROPE_INIT_FUNCTIONS``
    compute them (``modeling_rope_utils``), operation for operation.

    ``dynamic`` depends on ``seq_len`` (the largest position of the call + 1): up to
    ``max_position_embeddings`` it is plain RoPE (transformers keeps its init frequencies there),
    beyond it the NTK base is recomputed for that length, as ``dynamic_rope_update`` does.
    """
    kind = None if scaling is None else scaling["rope_type"]
    if kind is None:
        return _plain_inv_freq(dim, base, device), 1.0
    if kind == "linear":
        return _plain_inv_freq(dim, base, device) / scaling["factor"], 1.0
    if kind == "dynamic":
        if seq_len is None or seq_len <= max_position_embeddings:
            return _plain_inv_freq(dim, base, device), 1.0
        # transformers passes seq_len as a tensor (torch.max(position_ids) + 1): fp32 arithmetic
        seq = torch.tensor(seq_len, dtype=torch.int64, device=device)
        factor = scaling["factor"]
        base = base * ((factor * seq / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _plain_inv_freq(dim, base, device), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(dim, base, scaling, device), 1.0
    return _yarn_inv_freq(dim, base, scaling, max_position_embeddings, device)


def _llama3_inv_freq(dim: int, base: float, s: dict, device) -> torch.Tensor:
    inv_freq = _plain_inv_freq(dim, base, device)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context_len = s["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _yarn_inv_freq(
    dim: int, base: float, s: dict, max_position_embeddings: int | None, device
) -> tuple[torch.Tensor, float]:
    factor = s.get("factor")
    original = s["original_max_position_embeddings"]
    if factor is None:
        factor = max_position_embeddings / original

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(
                get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            )
        else:
            attention_factor = get_mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp.to(device=device, dtype=torch.float)
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def rope_cos_sin(
    positions: torch.Tensor,
    dim: int,
    base: float,
    dtype: torch.dtype,
    scaling: dict | None = None,
    max_position_embeddings: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for ``positions`` (s,) or (b, s) int64 -> (1, 1, s, r) or (b, 1, s, r).

    ``scaling`` (``ModelConfig.rope_scaling``) rescales the frequencies; yarn also multiplies
    cos and sin by its attention factor (in fp32, before the cast, as transformers does)."""
    device = positions.device
    dynamic = scaling is not None and scaling["rope_type"] == "dynamic"
    seq_len = int(positions.max()) + 1 if dynamic and positions.numel() else None
    inv_freq, attention_factor = rope_inv_freq(
        dim, base, scaling, max_position_embeddings, seq_len, device
    )
    pos = positions.float()
    if pos.dim() == 1:
        pos = pos[None]
    freqs = pos[..., None] * inv_freq  # (b, s, r/2), fp32
    emb = torch.cat((freqs, freqs), dim=-1)  # (b, s, r)
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


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
