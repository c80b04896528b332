"""The inference forward of one stage: positions and masks given, keys/values cached.

It reuses the training modules' weights and their TP forward functions (the column-parallel
QKV, the row-parallel output projection with its all-reduce, the MLP, the vocab-parallel
embedding and output layer); only the attention core differs from ``ParallelAttention``:
keys and values of this rank's heads are kept in a per-layer cache, and an explicit mask lets
left-padded prompts of different lengths share a batch.

Shapes: b batch, s new positions, T cache length, h hidden, nh/tp local heads, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtnlg.inference.stage import StageModel
from mtnlg.model.layers import TransformerBlock


class KVCache:
    """Keys and values of this rank's heads for every layer of the stage: (b, nh/tp, T, hd)."""

    def __init__(self, model: StageModel, batch: int, length: int, dtype, device):
        cfg = model.cfg
        heads = next(iter(model.layers.values())).attention.heads_local if model.layers else 0
        shape = (batch, heads, length, cfg.head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in model.layer_ids}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in model.layer_ids}


def attention_mask(valid: torch.Tensor, start: int, s: int) -> torch.Tensor:
    """(b, 1, s, start + s) bool: query i (slot start+i) sees the real keys at slots <= its own.

    ``valid`` (b, >= start+s) marks the slots holding real tokens (False: left padding). A
    padding query also sees itself, so no row is empty (its output is never used)."""
    t = start + s
    q = torch.arange(start, t, device=valid.device)[:, None]  # (s, 1)
    k = torch.arange(t, device=valid.device)[None, :]  # (1, t)
    causal = k <= q  # (s, t)
    mask = causal[None] & valid[:, None, :t]  # (b, s, t)
    mask |= (k == q)[None]
    return mask[:, None]


def block_forward(
    block: TransformerBlock,
    x: torch.Tensor,
    mask: torch.Tensor,
    cache_k: torch.Tensor | None,
    cache_v: torch.Tensor | None,
    start: int,
) -> torch.Tensor:
    """x (b, s, h) at cache slots [start, start + s) -> (b, s, h); writes its keys/values."""
    attn = block.attention
    b, s, _ = x.shape
    qkv = attn.qkv(block.ln_1(x))  # (b, s, 3h/tp): column-parallel, this rank's heads
    q, k, v = (
        t.view(b, s, attn.heads_local, attn.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1)
    )  # each (b, nh/tp, s, hd)
    if cache_k is not None:
        cache_k[:, :, start : start + s] = k
        cache_v[:, :, start : start + s] = v
        k, v = cache_k[:, :, : start + s], cache_v[:, :, : start + s]  # (b, nh/tp, T, hd)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (b, nh/tp, s, hd)
    y = y.transpose(1, 2).reshape(b, s, attn.heads_local * attn.head_dim)
    x = x + attn.dense(y)  # row-parallel: all-reduced over TP
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
        emb = model.embedding
        x = emb.word_embeddings(inputs) + emb.position_embeddings(positions)  # (b, s, h)
    else:
        x = inputs
    s = x.shape[1]
    mask = attention_mask(valid, start, s)
    for i in model.layer_ids:
        ck = cache.k[i] if cache is not None else None
        cv = cache.v[i] if cache is not None else None
        x = block_forward(model.layers[str(i)], x, mask, ck, cv, start)
    if model.final_norm is not None:
        x = model.final_norm(x)
    if not model.has_head:
        return x
    return model.embedding.lm_logits(x[:, -1])  # (b, V/tp)
