"""The inference forward of one stage: positions and masks given, keys/values cached.

It runs the training modules themselves: the embedding at each token's own position ids,
``ParallelAttention.project`` (column-parallel fused QKV, RoPE applied at those positions),
``attend`` (causal or masked attention, the GQA head -> group mapping), the row-parallel
``dense`` with its all-reduce, the MLP and the vocab-parallel output layer (tied or not). Only
the keys/values differ from training: those of this rank's KV heads are kept in a per-layer
cache (already rotated, so a cached key keeps the position it was written at), and an explicit
mask lets left-padded prompts of different lengths share a batch.

Shapes: b batch, s new positions, T cache length, h hidden, nh_l local query heads, kv_l local
key/value heads (GQA: fewer than nh_l), d head dim.
"""

from __future__ import annotations

import torch

from mtnlg.inference.stage import StageModel
from mtnlg.model.layers import TransformerBlock


class KVCache:
    """Keys and values of this rank's KV heads for every layer of the stage: (b, kv_l, T, d)."""

    def __init__(self, model: StageModel, batch: int, length: int, dtype, device):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for i in model.layer_ids:
            attn = model.layers[str(i)].attention
            shape = (batch, attn.kv_heads_local, length, attn.head_dim)
            self.k[i] = torch.zeros(shape, dtype=dtype, device=device)
            self.v[i] = torch.zeros(shape, dtype=dtype, device=device)


def attention_mask(valid: torch.Tensor, start: int, s: int, window: int | None = None):
    """(b, 1, s, start + s) bool: query i (slot start+i) sees the real keys at slots <= its own
    (and, with a sliding ``window``, only the last ``window`` of them: slot > own - window).

    ``valid`` (b, >= start+s) marks the slots holding real tokens (False: left padding: a
    sequence's slots and positions differ by its padding, so slot distances are position
    distances). A padding query also sees itself, so no row is empty (its output is unused)."""
    t = start + s
    q = torch.arange(start, t, device=valid.device)[:, None]  # (s, 1)
    k = torch.arange(t, device=valid.device)[None, :]  # (1, t)
    causal = k <= q  # (s, t)
    if window is not None:
        causal &= k > q - window
    mask = causal[None] & valid[:, None, :t]  # (b, s, t)
    mask |= (k == q)[None]
    return mask[:, None]


def block_forward(
    block: TransformerBlock,
    x: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    cache_k: torch.Tensor | None,
    cache_v: torch.Tensor | None,
    start: int,
) -> torch.Tensor:
    """x (b, s, h) at cache slots [start, start + s), position ids ``positions`` (b, s) ->
    (b, s, h); writes its keys/values into the cache."""
    attn = block.attention
    q, k, v = attn.project(block.ln_1(x), positions)  # (b, nh_l, s, d), (b, kv_l, s, d) x 2
    if cache_k is not None:
        end = start + k.shape[2]
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v
        k, v = cache_k[:, :, :end], cache_v[:, :, :end]  # (b, kv_l, T, d)
    return block_rest(block, x, q, k, v, mask)


def block_rest(block: TransformerBlock, x, q, k, v, mask) -> torch.Tensor:
    """The block after the projections: attention of q (b, nh_l, s, d) over the keys/values
    (b, kv_l, T, d) under ``mask``, the row-parallel output (all-reduced over TP), the MLP;
    x (b, s, h) -> (b, s, h)."""
    y = block.attention.attend(q, k, v, mask)  # (b, s, nh_l * d)
    x = x + block.attention.dense(y)  # row-parallel: all-reduced over TP
    return x + block.mlp(block.ln_2(x))


@torch.no_grad()
def stage_forward(
    model: StageModel,
    inputs: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    start: int,
    cache: KVCache | None,
) -> torch.Tensor:
    """Run the stage on slots [start, start + s).

    ``inputs``: token ids (b, s) on the first stage, else the hidden states (b, s, h) received
    from the previous one. ``positions`` (b, s) are each sequence's own position ids. Returns
    the hidden states (b, s, h) for the next stage, or on the last stage this rank's
    vocabulary shard of the logits of the last slot (b, V/tp), padding columns at -inf.
    """
    if model.has_input:
        x = model.embedding(inputs, positions)  # (b, s, h); positions unused with RoPE
    else:
        x = inputs
    s = x.shape[1]
    window = model.layers[str(model.layer_ids[0])].attention.window if model.layer_ids else None
    mask = attention_mask(valid, start, s, window)
    for i in model.layer_ids:
        ck = cache.k[i] if cache is not None else None
        cv = cache.v[i] if cache is not None else None
        x = block_forward(model.layers[str(i)], x, positions, mask, ck, cv, start)
    if model.final_norm is not None:
        x = model.final_norm(x)
    if not model.has_head:
        return x
    return model.head_logits(x[:, -1])  # (b, V/tp)
