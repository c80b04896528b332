"""The GPT building blocks, tensor-parallel: embedding, transformer block, final norm.

Each block costs exactly two TP all-reduces forward and two backward: attention is split by
heads (column-parallel fused QKV, row-parallel output projection) and the MLP by its inner width
(column-parallel up, GeLU local, row-parallel down). Shapes: b batch, s sequence, h hidden,
nh heads, hd head dim, tp tensor-parallel degree, V padded vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.config import ModelConfig
from mtnlg.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    parallel_lm_logits,
)
from mtnlg.tensor_parallel.random import get_rng_tracker


def normal_init(std: float) -> Callable[[torch.Tensor], None]:
    def init_(t: torch.Tensor) -> None:
        nn.init.normal_(t, mean=0.0, std=std)

    return init_


def _group_size(group) -> int:
    if group is None:
        return 1
    return torch.distributed.get_world_size(group)


class GPTEmbedding(nn.Module):
    """Token (vocab-parallel) + learned absolute position embeddings, then dropout.

    Also owns the output layer: ``lm_logits`` multiplies by the same word-embedding matrix
    (tied weights), producing this rank's vocabulary shard of the logits.

    The vocabulary is padded (to a multiple of 128 x TP) for even shards. Padding rows start at
    zero and their logits are masked to -inf, so they take no probability mass: the model computes
    the same function whatever the padding, hence whatever the TP degree, and exports to an
    unpadded Hugging Face model exactly.
    """

    def __init__(self, cfg: ModelConfig, tp_group=None):
        super().__init__()
        tp = _group_size(tp_group)
        self.tp_group = tp_group
        init = normal_init(cfg.init_method_std)
        vocab, padded = cfg.vocab_size, cfg.padded_vocab_size(tp)

        def init_words(full: torch.Tensor) -> None:
            # (V_padded, h): draw only the real rows, so the draw does not depend on padding
            init(full[:vocab])
            full[vocab:].zero_()

        self.word_embeddings = VocabParallelEmbedding(
            padded, cfg.hidden_size, tp_group=tp_group, init_method=init_words
        )
        # This rank's padding columns: [pad_from, shard) of its logits (None: no padding here).
        shard = padded // tp
        start = shard * (torch.distributed.get_rank(tp_group) if tp_group is not None else 0)
        self._pad_from = min(max(vocab - start, 0), shard) if vocab < start + shard else None
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        init(self.position_embeddings.weight)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: (b, s) int64 -> (b, s, h)
        s = input_ids.shape[-1]
        pos = torch.arange(s, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        return self.dropout(x)  # replicated across TP: default generator, equal masks

    def lm_logits(self, hidden: torch.Tensor, mask_padding: bool = True) -> torch.Tensor:
        """hidden: (b, s, h) -> logits shard (b, s, V/tp); padding columns -> -inf.

        ``mask_padding=False`` leaves the padding columns as computed (zero rows give 0), for a
        consumer that excludes them itself (``GPTLoss`` with its ``vocab_size``).
        """
        logits = parallel_lm_logits(hidden, self.word_embeddings.weight, self.tp_group)
        if not mask_padding or self._pad_from is None:
            return logits
        if logits.requires_grad:  # out of place: the mask's backward zeroes the padding grads
            pad = torch.arange(logits.shape[-1], device=logits.device) >= self._pad_from
            return logits.masked_fill(pad, float("-inf"))
        logits[..., self._pad_from :] = float("-inf")  # no autograd: fill the fresh tensor
        return logits


class ParallelAttention(nn.Module):
    """Causal self-attention split by heads: each TP rank computes nh/tp heads."""

    def __init__(self, cfg: ModelConfig, tp_group=None):
        super().__init__()
        tp = _group_size(tp_group)
        h = cfg.hidden_size
        self.heads_local = cfg.num_attention_heads // tp
        self.head_dim = cfg.head_dim
        self.dropout_p = cfg.attention_dropout
        std = cfg.init_method_std
        # Global layout of the fused projection is [q | k | v] (as Hugging Face GPT-2);
        # stride 3 gives each rank [q_local | k_local | v_local] for its own heads.
        self.qkv = ColumnParallelLinear(
            h, 3 * h, tp_group=tp_group, stride=3, init_method=normal_init(std)
        )
        self.dense = RowParallelLinear(
            h, h, tp_group=tp_group, init_method=normal_init(std / math.sqrt(2 * cfg.num_layers))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x)  # (b, s, 3*h/tp)
        q, k, v = qkv.chunk(3, dim=-1)  # each (b, s, h/tp)
        q, k, v = (t.view(b, s, self.heads_local, self.head_dim).transpose(1, 2) for t in (q, k, v))
        # (b, nh/tp, s, hd); dropout on split heads: the model-parallel generator
        p = self.dropout_p if self.training else 0.0
        if p > 0.0:
            with get_rng_tracker().fork():
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, s, self.heads_local * self.head_dim)  # (b, s, h/tp)
        return self.dense(y)  # (b, s, h), all-reduced


class ParallelMLP(nn.Module):
    """h -> 4h (column-parallel) -> GeLU (tanh, local) -> h (row-parallel)."""

    def __init__(self, cfg: ModelConfig, tp_group=None):
        super().__init__()
        std = cfg.init_method_std
        self.up = ColumnParallelLinear(
            cfg.hidden_size, cfg.ffn_hidden_size, tp_group=tp_group, init_method=normal_init(std)
        )
        self.down = RowParallelLinear(
            cfg.ffn_hidden_size,
            cfg.hidden_size,
            tp_group=tp_group,
            init_method=normal_init(std / math.sqrt(2 * cfg.num_layers)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (b, s, h) -> (b, s, 4h/tp) -> (b, s, h)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(attn(ln_1(x))), then x + drop(mlp(ln_2(x)))."""

    def __init__(self, cfg: ModelConfig, tp_group=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attention = ParallelAttention(cfg, tp_group)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = ParallelMLP(cfg, tp_group)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, s, h), replicated over TP
        x = x + self.dropout(self.attention(self.ln_1(x)))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class FinalLayerNorm(nn.LayerNorm):
    """The final LayerNorm before the (tied) output layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, eps=cfg.layernorm_epsilon)
