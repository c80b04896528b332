"""A minimal plain-PyTorch GPT-2 (nanoGPT style): the baseline our model is measured against.

Same architecture and shapes as ``mtnlg.model.GPTModel`` at TP=1, written with nothing but
``nn.Linear`` / ``nn.Embedding`` / ``F.scaled_dot_product_attention`` / ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, h: int, nh: int):
        super().__init__()
        self.nh = nh
        self.ln_1, self.ln_2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.c_attn, self.c_proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.c_fc, self.mlp_proj = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.nh, h // self.nh).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, nh, s, hd)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, s, h))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class ReferenceGPT(nn.Module):
    def __init__(self, layers: int, h: int, nh: int, seq: int, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, h), nn.Embedding(seq, h)
        self.blocks = nn.ModuleList(Block(h, nh) for _ in range(layers))
        self.ln_f = nn.LayerNorm(h)

    @classmethod
    def from_config(cls, cfg) -> ReferenceGPT:
        """The same shape as ``GPTModel(cfg)`` at TP=1 (vocabulary padded the same way)."""
        return cls(
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.seq_length,
            cfg.padded_vocab_size(1),
        )

    def forward(self, ids, labels):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied output layer
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())
