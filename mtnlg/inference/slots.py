"""A slot-based KV cache and the stage forward that reads and writes it (continuous batching).

Each of ``S`` slots holds one sequence's keys and values from position 0; sequences of any
length share a step because every row carries its own write position: a prefill writes one
sequence's prompt into its slot at positions [0, n), a decode step writes one token per active
slot at that slot's own position. A query at position p sees the keys at positions <= p of its
own slot (and, with a sliding window, only the last ``window`` of them); nothing is padded, so
a sequence's computation does not depend on which other slots are busy.

Shapes: S slots, B rows in this step (active slots), s new positions per row, T the slot length,
t the keys read this step (max position + 1), kv_l local KV heads, d head dim, h hidden.
"""

from __future__ import annotations

import torch

from mtnlg.inference.forward import KVCache, block_rest
from mtnlg.inference.stage import StageModel
from mtnlg.model.layers import TransformerBlock


class SlotCache(KVCache):
    """The per-layer KV cache with one row per slot: (S, kv_l, T, d)."""

    def __init__(self, model: StageModel, slots: int, length: int, dtype, device):
        super().__init__(model, slots, length, dtype, device)
        self.slots, self.length = slots, length


def slot_mask(start: torch.Tensor, s: int, t: int, window: int | None) -> torch.Tensor:
    """(B, 1, s, t) bool: query j of row i (position start_i + j) sees keys at positions
    <= its own (and > own - window with a sliding window)."""
    q = start[:, None] + torch.arange(s, device=start.device)[None]  # (B, s)
    k = torch.arange(t, device=start.device)  # (t,)
    mask = k[None, None] <= q[:, :, None]  # (B, s, t)
    if window is not None:
        mask &= k[None, None] > q[:, :, None] - window
    return mask[:, None]


def _block(
    block: TransformerBlock,
    x: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    ck: torch.Tensor,
    cv: torch.Tensor,
    slots: torch.Tensor,
    t: int,
) -> torch.Tensor:
    """x (B, s, h) at ``positions`` (B, s) of ``slots`` (B,) -> (B, s, h); writes its keys and
    values into the slots, reads keys [0, t)."""
    attn = block.attention
    q, k, v = attn.project(block.ln_1(x), positions)  # (B, nh_l, s, d), (B, kv_l, s, d) x 2
    s = k.shape[2]
    if s == 1:  # decode: one position per row, each at its own place
        ck[slots, :, positions[:, 0]] = k[:, :, 0]
        cv[slots, :, positions[:, 0]] = v[:, :, 0]
    else:  # prefill: one row, positions p0 .. p0 + s - 1
        p0 = int(positions[0, 0])
        ck[slots[0], :, p0 : p0 + s] = k[0]
        cv[slots[0], :, p0 : p0 + s] = v[0]
    keys = ck[:, :, :t].index_select(0, slots)  # (B, kv_l, t, d): only the t positions used
    values = cv[:, :, :t].index_select(0, slots)
    return block_rest(block, x, q, keys, values, mask)


@torch.no_grad()
def slot_forward(
    model: StageModel,
    inputs: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    cache: SlotCache,
    all_logits: bool = False,
) -> torch.Tensor:
    """Run the stage for rows ``slots`` (B,) at ``positions`` (B, s) (consecutive per row;
    s > 1 only with B = 1, a prefill).

    ``inputs``: token ids (B, s) on the first stage, else the hidden states (B, s, h) of the
    previous one. Returns hidden states (B, s, h) for the next stage, or on the last stage this
    rank's vocabulary shard of the logits (padding columns at -inf) of the last position
    (B, V/tp), or of every position (B, s, V/tp) with ``all_logits``.
    """
    if inputs.shape[1] > 1 and inputs.shape[0] != 1:
        raise ValueError("a prefill runs one sequence at a time")
    x = model.embedding(inputs, positions) if model.has_input else inputs  # (B, s, h)
    s = x.shape[1]
    t = int(positions[:, -1].max()) + 1
    first = model.layer_ids[0] if model.layer_ids else None
    window = model.layers[str(first)].attention.window if first is not None else None
    mask = slot_mask(positions[:, 0], s, t, window)
    for i in model.layer_ids:
        x = _block(model.layers[str(i)], x, positions, mask, cache.k[i], cache.v[i], slots, t)
    if model.final_norm is not None:
        x = model.final_norm(x)
    if not model.has_head:
        return x
    return model.head_logits(x if all_logits else x[:, -1])
