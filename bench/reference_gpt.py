"""Minimal plain-PyTorch GPT-2 and Llama (nanoGPT style): the baselines our model is measured
against.

Same architecture and shapes as ``mtnlg.model.GPTModel`` at TP=1, written with nothing but
``nn.Linear`` / ``nn.Embedding`` / ``nn.RMSNorm`` / ``F.scaled_dot_product_attention`` /
``F.cross_entropy``. ``ReferenceLlama``: RoPE, RMSNorm, SwiGLU, GQA, untied output, no biases.
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


def _rotate(x, cos, sin):
    """HF Llama's rotate_half convention on the whole head dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaBlock(nn.Module):
    def __init__(self, h: int, nh: int, groups: int, f: int, eps: float):
        super().__init__()
        self.nh, self.g, self.d = nh, groups, h // nh
        self.ln_1, self.ln_2 = nn.RMSNorm(h, eps=eps), nn.RMSNorm(h, eps=eps)
        self.qkv = nn.Linear(h, (nh + 2 * groups) * self.d, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.gate_up = nn.Linear(h, 2 * f, bias=False)
        self.down = nn.Linear(f, h, bias=False)

    def forward(self, x, cos, sin):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split([h, self.g * self.d, self.g * self.d], dim=2)
        q = q.view(b, s, self.nh, self.d).transpose(1, 2)  # (b, nh, s, d)
        k, v = (t.view(b, s, self.g, self.d).transpose(1, 2) for t in (k, v))  # (b, g, s, d)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.g != self.nh)
        x = x + self.o_proj(y.transpose(1, 2).reshape(b, s, h))
        gate, up = self.gate_up(self.ln_2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class ReferenceLlama(nn.Module):
    def __init__(self, layers, h, nh, groups, f, vocab, base=10000.0, eps=1e-5):
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.blocks = nn.ModuleList(LlamaBlock(h, nh, groups, f, eps) for _ in range(layers))
        self.norm = nn.RMSNorm(h, eps=eps)
        self.lm_head = nn.Linear(h, vocab, bias=False)
        d = h // nh
        self.register_buffer("inv_freq", base ** (-torch.arange(0, d, 2).float() / d), False)

    @classmethod
    def from_config(cls, cfg) -> ReferenceLlama:
        """The shape of a Llama-style ``GPTModel(cfg)`` at TP=1 (full rotary)."""
        return cls(
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.kv_groups,
            cfg.ffn_hidden_size,
            cfg.padded_vocab_size(1),
            cfg.rotary_base,
            cfg.layernorm_epsilon,
        )

    def forward(self, ids, labels):
        angles = torch.outer(torch.arange(ids.shape[1]).float(), self.inv_freq)
        emb = torch.cat((angles, angles), dim=-1)  # (s, d)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())
