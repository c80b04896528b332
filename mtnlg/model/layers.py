"""The GPT building blocks, tensor-parallel: embedding, transformer block, final norm.

Each block costs exactly two TP all-reduces forward and two backward: attention is split by
heads (column-parallel fused QKV, row-parallel output projection) and the MLP by its inner width
(column-parallel up, GeLU local, row-parallel down). Shapes: b batch, s sequence, h hidden,
nh heads, hd head dim, tp tensor-parallel degree, V padded vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.config import ModelConfig
from mtnlg.model.fused import dropout_add_fn, fusion_enabled, gelu_fn
from mtnlg.model.rotary import apply_rope, rope_cos_sin
from mtnlg.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp_region,
    parallel_lm_logits,
)
from mtnlg.tensor_parallel.gqa import GQAQKVLinear
from mtnlg.tensor_parallel.random import get_rng_tracker
from mtnlg.tensor_parallel.sequence import scatter_to_sequence


def normal_init(std: float) -> Callable[[torch.Tensor], None]:
    def init_(t: torch.Tensor) -> None:
        nn.init.normal_(t, mean=0.0, std=std)

    return init_


def _group_size(group) -> int:
    if group is None:
        return 1
    return torch.distributed.get_world_size(group)


def _sequence_parallel(cfg: ModelConfig, tp_group) -> bool:
    return cfg.sequence_parallel and _group_size(tp_group) > 1


def _dropout_rng(dropout: nn.Dropout, sequence_parallel: bool):
    """The generator of a dropout: on a sequence slice (sequence parallelism) the model-parallel
    one, so the TP ranks' slices get independent masks; else the default one."""
    if sequence_parallel and dropout.training and dropout.p > 0.0:
        return get_rng_tracker().fork()
    return nullcontext()


def sp_dropout(dropout: nn.Dropout, x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    with _dropout_rng(dropout, sequence_parallel):
        return dropout(x)


class _VocabHead:
    """The vocab-parallel output GEMM shared by the tied embedding and ``OutputLayer``.

    The vocabulary is padded (to a multiple of 128 x TP) for even shards. Padding rows start at
    zero and their logits are masked to -inf, so they take no probability mass: the model computes
    the same function whatever the padding, hence whatever the TP degree, and exports to an
    unpadded Hugging Face model exactly.
    """

    tp_group = None
    sequence_parallel = False
    _pad_from: int | None = None

    def _set_padding(self, cfg: ModelConfig, tp_group) -> None:
        # This rank's padding columns: [pad_from, shard) of its logits (None: no padding here).
        tp = _group_size(tp_group)
        shard = cfg.padded_vocab_size(tp) // tp
        start = shard * (torch.distributed.get_rank(tp_group) if tp_group is not None else 0)
        vocab = cfg.vocab_size
        self._pad_from = min(max(vocab - start, 0), shard) if vocab < start + shard else None

    def _head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def lm_logits(self, hidden: torch.Tensor, mask_padding: bool = True) -> torch.Tensor:
        """hidden: (b, s, h) -> logits shard (b, s, V/tp); padding columns -> -inf.

        ``mask_padding=False`` leaves the padding columns as computed (zero rows give 0), for a
        consumer that excludes them itself (``GPTLoss`` with its ``vocab_size``).
        """
        logits = parallel_lm_logits(
            hidden, self._head_weight(), self.tp_group, self.sequence_parallel
        )
        if not mask_padding or self._pad_from is None:
            return logits
        if logits.requires_grad:  # out of place: the mask's backward zeroes the padding grads
            pad = torch.arange(logits.shape[-1], device=logits.device) >= self._pad_from
            return logits.masked_fill(pad, float("-inf"))
        logits[..., self._pad_from :] = float("-inf")  # no autograd: fill the fresh tensor
        return logits


def _vocab_init(cfg: ModelConfig) -> Callable[[torch.Tensor], None]:
    init = normal_init(cfg.init_method_std)

    def init_words(full: torch.Tensor) -> None:
        # (V_padded, h): draw only the real rows, so the draw does not depend on padding
        init(full[: cfg.vocab_size])
        full[cfg.vocab_size :].zero_()

    return init_words


class GPTEmbedding(_VocabHead, nn.Module):
    """Token (vocab-parallel) + learned absolute position embeddings, then dropout.

    With RoPE (``--position-embedding-type rope``) there is no position table: positions enter
    in the attention. When the output layer is tied (GPT-2, MT-NLG), ``lm_logits`` multiplies
    by the same word-embedding matrix, producing this rank's vocabulary shard of the logits.

    ``head_only=True`` builds only what ``lm_logits`` uses, the word embeddings: the tied copy
    on the last pipeline stage, which never embeds tokens (no position table, no dropout; its
    ``forward`` refuses).
    """

    def __init__(self, cfg: ModelConfig, tp_group=None, head_only: bool = False):
        super().__init__()
        tp = _group_size(tp_group)
        self.tp_group = tp_group
        self.head_only = head_only
        self.word_embeddings = VocabParallelEmbedding(
            cfg.padded_vocab_size(tp), cfg.hidden_size, tp_group=tp_group,
            init_method=_vocab_init(cfg),
        )  # fmt: skip
        self._set_padding(cfg, tp_group)
        self.sequence_parallel = _sequence_parallel(cfg, tp_group)
        self.position_embeddings = None
        self.dropout = None
        if head_only:
            return
        if not cfg.use_rope:
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
            normal_init(cfg.init_method_std)(self.position_embeddings.weight)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def _head_weight(self) -> torch.Tensor:
        return self.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None):
        # input_ids: (b, s) int64, positions (b, s) or None (0..s-1) -> (b, s, h)
        if self.head_only:
            raise RuntimeError("GPTEmbedding(head_only=True) only computes lm_logits")
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if positions is None:
                positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
            x = x + self.position_embeddings(positions)
        if self.sequence_parallel:  # (b, s, h) -> this rank's (b, s/tp, h)
            return sp_dropout(self.dropout, scatter_to_sequence(x, self.tp_group), True)
        return self.dropout(x)  # replicated across TP: default generator, equal masks


class OutputLayer(_VocabHead, nn.Module):
    """The untied output layer (``--untie-embeddings-and-output-weights``): ``weight`` is a
    vocab-parallel (V_padded/tp, h) shard, padded rows zero, on the last pipeline stage."""

    def __init__(self, cfg: ModelConfig, tp_group=None, mask_padding: bool = True):
        super().__init__()
        tp = _group_size(tp_group)
        self.tp_group = tp_group
        self.mask_padding = mask_padding  # forward(): False leaves the padding to the loss
        # the same vocab-parallel shard and init rule as the word embedding
        emb = VocabParallelEmbedding(
            cfg.padded_vocab_size(tp), cfg.hidden_size, tp_group=tp_group,
            init_method=_vocab_init(cfg),
        )  # fmt: skip
        self.weight = emb.weight
        self._set_padding(cfg, tp_group)
        self.sequence_parallel = _sequence_parallel(cfg, tp_group)

    def _head_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_logits(hidden, mask_padding=self.mask_padding)


def sliding_causal_mask(s: int, window: int, device) -> torch.Tensor:
    """(s, s) bool, True = may attend: key j for query i when i - window < j <= i
    (transformers' sliding-window causal mask)."""
    i = torch.arange(s, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    return (j <= i) & (j > i - window)


class ParallelAttention(nn.Module):
    """Causal self-attention split by heads: each TP rank computes nh/tp query heads.

    Plain multi-head attention fuses [q | k | v] (stride 3 over TP, GPT-2's layout); with
    ``--num-query-groups`` the fused projection is ``GQAQKVLinear`` (grouped layout). RoPE, when
    on, rotates q and k at each token's position before the attention.
    """

    def __init__(self, cfg: ModelConfig, tp_group=None):
        super().__init__()
        tp = _group_size(tp_group)
        h, nh, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        a = cfg.attention_dim  # nh x hd: h, unless --kv-channels says otherwise
        if nh % tp:
            raise ValueError(f"--num-attention-heads ({nh}) is not divisible by the TP size ({tp})")
        self.heads_local = nh // tp
        self.head_dim = d
        self.dropout_p = cfg.attention_dropout
        self.window = cfg.sliding_window  # None: plain causal attention
        self.rope = (cfg.rotary_dim, cfg.rotary_base) if cfg.use_rope else None
        self.rope_scaling = (cfg.rope_scaling, cfg.max_position_embeddings)
        std = cfg.init_method_std
        sp = {"sequence_parallel": _sequence_parallel(cfg, tp_group)}
        if cfg.num_query_groups is None:
            # Global layout [q | k | v] (as Hugging Face GPT-2); stride 3 gives each rank
            # [q_local | k_local | v_local] for its own heads.
            self.qkv = ColumnParallelLinear(
                h, 3 * a, tp_group=tp_group, stride=3, bias=cfg.qkv_bias,
                init_method=normal_init(std), **sp,
            )  # fmt: skip
            self.kv_heads_local = self.heads_local
        else:
            self.qkv = GQAQKVLinear(
                h, nh, cfg.num_query_groups, d, tp_group=tp_group, bias=cfg.qkv_bias,
                init_method=normal_init(std), **sp,
            )  # fmt: skip
            self.kv_heads_local = self.qkv.groups_local
        self.dense = RowParallelLinear(
            a, h, tp_group=tp_group, bias=cfg.add_bias_linear,
            init_method=normal_init(std / math.sqrt(2 * cfg.num_layers)), **sp,
        )  # fmt: skip

    def project(self, x: torch.Tensor, positions: torch.Tensor | None = None):
        """x (b, s, h) -> q (b, nh/tp, s, hd), k and v (b, kv/tp, s, hd); RoPE applied at
        ``positions`` ((b, s) or (s,); None: 0..s-1)."""
        qkv = self.qkv(x)  # (b, s, local rows); x is (b, s/tp, h) with sequence parallelism
        b, s = qkv.shape[:2]
        if isinstance(self.qkv, GQAQKVLinear):
            q, k, v = self.qkv.split_heads(qkv)
        else:
            q, k, v = qkv.chunk(3, dim=-1)  # each (b, s, nh/tp x hd)
            q, k, v = (
                t.view(b, s, self.heads_local, self.head_dim).transpose(1, 2) for t in (q, k, v)
            )
        if self.rope is not None:
            if positions is None:
                positions = torch.arange(s, device=qkv.device)
            cos, sin = rope_cos_sin(
                positions, self.rope[0], self.rope[1], q.dtype, *self.rope_scaling
            )
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attend(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        """q (b, nh/tp, s, hd), k/v (b, kv/tp, T, hd) -> (b, s, nh/tp x hd); causal without ``mask``
        (bool (b, 1, s, T), True = may attend; the caller applies the sliding window to it)."""
        b, _, s, _ = q.shape
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        if mask is None and self.window is not None and s > self.window:
            mask = sliding_causal_mask(s, self.window, q.device)  # (s, s)
        causal = {"attn_mask": mask} if mask is not None else {"is_causal": True}
        # dropout on split heads: the model-parallel generator
        p = self.dropout_p if self.training else 0.0
        if p > 0.0:
            with get_rng_tracker().fork():
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, **causal, **gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, **causal, **gqa)
        return y.transpose(1, 2).reshape(b, s, self.heads_local * self.head_dim)

    def forward(self, x: torch.Tensor, skip_bias_add: bool = False):
        y = self.attend(*self.project(x))  # (b, s, nh/tp x hd)
        return self.dense(y, skip_bias_add)  # (b, s, h), all-reduced (+ the bias, or apart)


class ParallelMLP(nn.Module):
    """h -> f (column-parallel) -> GeLU (tanh, local) -> h (row-parallel).

    With ``--swiglu`` the column-parallel layer is [gate | up] (2f, stride 2 over TP: each rank
    holds its own gate and up columns) and the activation silu(gate) * up.
    """

    def __init__(self, cfg: ModelConfig, tp_group=None):
        super().__init__()
        std, f = cfg.init_method_std, cfg.ffn_hidden_size
        self.swiglu = cfg.swiglu
        sp = {"sequence_parallel": _sequence_parallel(cfg, tp_group)}
        self.up = ColumnParallelLinear(
            cfg.hidden_size, 2 * f if self.swiglu else f, tp_group=tp_group,
            stride=2 if self.swiglu else 1, bias=cfg.add_bias_linear,
            init_method=normal_init(std), **sp,
        )  # fmt: skip
        self.down = RowParallelLinear(
            f, cfg.hidden_size, tp_group=tp_group, bias=cfg.add_bias_linear,
            init_method=normal_init(std / math.sqrt(2 * cfg.num_layers)), **sp,
        )  # fmt: skip

    def forward(self, x: torch.Tensor, skip_bias_add: bool = False):
        # (b, s, h) -> (b, s, f/tp) -> (b, s, h); skip_bias_add: (y, down's bias) apart
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)  # each (b, s, f/tp)
            return self.down(F.silu(gate) * up, skip_bias_add)
        if fusion_enabled()[0]:  # the GEMM without its bias, then bias + GeLU in one pass
            return self.down(gelu_fn()(*self.up(x, skip_bias_add=True)), skip_bias_add)
        return self.down(F.gelu(self.up(x), approximate="tanh"), skip_bias_add)


class Norm(nn.Module):
    """LayerNorm (weight, bias) or, with ``--normalization rmsnorm``, RMSNorm (weight only,
    computed in fp32 and cast back before the weight, as Hugging Face's LlamaRMSNorm).

    With sequence parallelism each TP rank normalises its own sequence slice, so its weight
    gradient is partial: the parameters pass through ``copy_to_tp_region`` (gradient summed
    over TP); they stay replicated (no TP attributes: counted once in the gradient norm).
    """

    def __init__(self, cfg: ModelConfig, tp_group=None):
        super().__init__()
        h = cfg.hidden_size
        self.rms = cfg.normalization == "rmsnorm"
        self.eps = cfg.layernorm_epsilon
        self.weight = nn.Parameter(torch.ones(h))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(h))
        self.tp_group = tp_group if _sequence_parallel(cfg, tp_group) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.tp_group is not None:  # sequence parallel: gradients summed over TP
            w = copy_to_tp_region(w, self.tp_group)
            b = None if b is None else copy_to_tp_region(b, self.tp_group)
        if not self.rms:
            return F.layer_norm(x, w.shape, w, b, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * x32.to(x.dtype)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(attn(ln_1(x))), then x + drop(mlp(ln_2(x)))."""

    def __init__(self, cfg: ModelConfig, tp_group=None):
        super().__init__()
        self.ln_1 = Norm(cfg, tp_group)
        self.attention = ParallelAttention(cfg, tp_group)
        self.ln_2 = Norm(cfg, tp_group)
        self.mlp = ParallelMLP(cfg, tp_group)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.sequence_parallel = _sequence_parallel(cfg, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, s, h) replicated over TP, or its (b, s/tp, h) slice with sequence parallelism
        sp = self.sequence_parallel
        if fusion_enabled()[1]:  # bias + dropout + residual in one pass, twice
            x = self._fused_add(self.attention(self.ln_1(x), skip_bias_add=True), x)
            return self._fused_add(self.mlp(self.ln_2(x), skip_bias_add=True), x)
        x = x + sp_dropout(self.dropout, self.attention(self.ln_1(x)), sp)
        return x + sp_dropout(self.dropout, self.mlp(self.ln_2(x)), sp)

    def _fused_add(self, y_bias, residual: torch.Tensor) -> torch.Tensor:
        with _dropout_rng(self.dropout, self.sequence_parallel):
            return dropout_add_fn()(*y_bias, residual, self.dropout.p, self.training)


class FinalLayerNorm(Norm):
    """The final LayerNorm (or RMSNorm) before the output layer."""
