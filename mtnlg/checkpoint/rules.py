"""Tensor-parallel rules for ``GPTModel`` state dicts: a table of how each tensor shards.

Every parameter name maps to one of four kinds (plus the fused QKV, handled explicitly):

=============  ==========================================  =============================
kind           tensors                                     split / merge
=============  ==========================================  =============================
vocab          ``embedding.word_embeddings.weight``        dim 0, padded with zero rows
column         ``mlp.up.{weight,bias}``                    dim 0
column_qkv     ``attention.qkv.{weight,bias}``             dim 0, stride 3 ([q | k | v]);
                                                           GQA: ``tensor_parallel.gqa``
row            ``attention.dense.weight``, ``mlp.down.weight``  dim 1
replicated     LayerNorms, row-parallel biases, positions  copied (merge checks equality)
=============  ==========================================  =============================

``mlp.up`` splits with stride 2 under ``--swiglu`` ([gate | up]); ``output_layer.weight`` (an
untied output layer) is a vocab tensor like the embedding. Which names exist follows the config
(no position table with RoPE, no norm biases with RMSNorm, no linear biases when disabled).

All functions here are pure: tensors in, tensors out, no files and no process groups.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from mtnlg.config import ModelConfig
from mtnlg.tensor_parallel.gqa import gqa_local_rows, gqa_merge, gqa_split
from mtnlg.tensor_parallel.layers import merge_partitions, split_tensor_for_rank

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"

# (regex on the GPTModel name, kind); the first match wins.
TP_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^embedding\.word_embeddings\.weight$"), "vocab"),
    (re.compile(r"^embedding\.position_embeddings\.weight$"), "replicated"),
    (re.compile(r"^layers\.\d+\.ln_[12]\.(weight|bias)$"), "replicated"),
    (re.compile(r"^layers\.\d+\.attention\.qkv\.(weight|bias)$"), "column_qkv"),
    (re.compile(r"^layers\.\d+\.attention\.dense\.weight$"), "row"),
    (re.compile(r"^layers\.\d+\.attention\.dense\.bias$"), "replicated"),
    (re.compile(r"^layers\.\d+\.mlp\.up\.(weight|bias)$"), "column"),
    (re.compile(r"^layers\.\d+\.mlp\.down\.weight$"), "row"),
    (re.compile(r"^layers\.\d+\.mlp\.down\.bias$"), "replicated"),
    (re.compile(r"^final_norm\.(weight|bias)$"), "replicated"),
    (re.compile(r"^output_layer\.weight$"), "vocab"),  # untied output layer
    (re.compile(r"^score\.weight$"), "replicated"),  # classification head (finetuning)
]

# kind -> (partition dim, stride); None for replicated tensors
SPLIT_DIMS: dict[str, tuple[int, int] | None] = {
    "vocab": (0, 1),
    "column": (0, 1),
    "column_qkv": (0, 3),
    "row": (1, 1),
    "replicated": None,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted: the message names the file, key or shape."""


def tp_kind(name: str) -> str:
    """How ``name`` (a ``GPTModel`` parameter) shards under TP; unknown names are refused."""
    for pattern, kind in TP_RULES:
        if pattern.match(name):
            return kind
    raise CheckpointError(f"unknown parameter {name!r}: no tensor-parallel rule for it")


def expected_names(cfg: ModelConfig) -> list[str]:
    """Every ``GPTModel`` parameter name, in module order."""
    names = [WORD_EMBEDDINGS]
    if not cfg.use_rope:
        names.append("embedding.position_embeddings.weight")
    block = block_params(cfg)
    for i in range(cfg.num_layers):
        names += [f"layers.{i}.{n}" for n in block]
    names += ["final_norm.weight"] + ([] if cfg.normalization == "rmsnorm" else ["final_norm.bias"])
    return names + ([] if cfg.tied else [OUTPUT_LAYER])


BLOCK_PARAMS = [
    "ln_1.weight",
    "ln_1.bias",
    "attention.qkv.weight",
    "attention.qkv.bias",
    "attention.dense.weight",
    "attention.dense.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.up.weight",
    "mlp.up.bias",
    "mlp.down.weight",
    "mlp.down.bias",
]
"""A GPT-2 block's parameters; ``block_params(cfg)`` drops those a config does not have."""


def block_params(cfg: ModelConfig) -> list[str]:
    """The parameters of one transformer block under ``cfg``, in module order."""
    absent = set()
    if cfg.normalization == "rmsnorm":
        absent |= {"ln_1.bias", "ln_2.bias"}
    if not cfg.qkv_bias:
        absent.add("attention.qkv.bias")
    if not cfg.add_bias_linear:
        absent |= {"attention.dense.bias", "mlp.up.bias", "mlp.down.bias"}
    return [n for n in BLOCK_PARAMS if n not in absent]


def full_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of ``name`` in the full (TP=1, unpadded) state dict."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    if name in (WORD_EMBEDDINGS, OUTPUT_LAYER):
        return (cfg.vocab_size, h)
    if name == "embedding.position_embeddings.weight":
        return (cfg.max_position_embeddings, h)
    leaf = name.split(".", 2)[-1] if name.startswith("layers.") else name
    qkv = (cfg.num_attention_heads + 2 * cfg.kv_groups) * cfg.head_dim
    up = 2 * f if cfg.swiglu else f
    return {
        "ln_1.weight": (h,),
        "ln_1.bias": (h,),
        "ln_2.weight": (h,),
        "ln_2.bias": (h,),
        "attention.qkv.weight": (qkv, h),
        "attention.qkv.bias": (qkv,),
        "attention.dense.weight": (h, cfg.attention_dim),
        "attention.dense.bias": (h,),
        "mlp.up.weight": (up, h),
        "mlp.up.bias": (up,),
        "mlp.down.weight": (h, f),
        "mlp.down.bias": (h,),
        "final_norm.weight": (h,),
        "final_norm.bias": (h,),
    }[leaf]


def split_of(name: str, cfg: ModelConfig) -> tuple[int, int] | str | None:
    """How ``name`` splits over TP under ``cfg``: (dim, stride), ``"gqa"``, or None (replicated)."""
    kind = tp_kind(name)
    if kind == "column_qkv" and cfg.num_query_groups is not None:
        return "gqa"
    if kind == "column" and cfg.swiglu:
        return (0, 2)  # [gate | up]
    return SPLIT_DIMS[kind]


def shard_shape(name: str, cfg: ModelConfig, tp: int) -> tuple[int, ...]:
    """Shape of one TP rank's shard of ``name`` (vocabulary padded for ``tp``)."""
    shape = list(full_shape(name, cfg))
    if tp_kind(name) == "vocab":
        shape[0] = cfg.padded_vocab_size(tp)
    split = split_of(name, cfg)
    if split == "gqa":
        shape[0] = gqa_local_rows(cfg.num_attention_heads, cfg.kv_groups, cfg.head_dim, tp)
    elif split is not None:
        dim = split[0] if split[0] < len(shape) else 0
        shape[dim] //= tp
    return tuple(shape)


def check_full(name: str, t: Tensor, cfg: ModelConfig) -> None:
    want = full_shape(name, cfg)
    if tuple(t.shape) != want:
        raise CheckpointError(f"{name}: shape {tuple(t.shape)} does not match the config {want}")


def pad_vocab(t: Tensor, cfg: ModelConfig, tp: int) -> Tensor:
    """(V, ...) -> (padded_vocab_size(tp), ...) with zero rows (as the model initialises them)."""
    extra = cfg.padded_vocab_size(tp) - t.shape[0]
    if extra < 0:
        raise CheckpointError(f"vocabulary of {t.shape[0]} rows exceeds the padded size")
    if extra == 0:
        return t
    return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))], dim=0)


def shard_tensor(name: str, full: Tensor, cfg: ModelConfig, tp: int, tp_rank: int) -> Tensor:
    """This TP rank's shard of one full tensor (padded first if it is the vocabulary)."""
    if tp_kind(name) == "vocab":
        full = pad_vocab(full, cfg, tp)
    split = split_of(name, cfg)
    if split == "gqa":
        nh, g, d = cfg.num_attention_heads, cfg.kv_groups, cfg.head_dim
        return gqa_split(full, nh, g, d, tp, tp_rank).contiguous()
    if split is None or tp == 1:
        return full.clone() if split is None else full.contiguous()
    dim, stride = split
    if dim >= full.dim():
        dim = 0  # a column-parallel bias splits along its only dimension
    return split_tensor_for_rank(full, dim, tp_rank, tp, stride).contiguous()


def merge_tensor(name: str, parts: list[Tensor], cfg: ModelConfig, check: bool = True) -> Tensor:
    """The full tensor from every TP rank's shard (rank order); vocabulary padding dropped.

    Replicated tensors must agree across ranks (``check``), else the checkpoint is refused.
    """
    kind = tp_kind(name)
    split = split_of(name, cfg)
    if split == "gqa":
        return gqa_merge(parts, cfg.num_attention_heads, cfg.kv_groups, cfg.head_dim)
    if split is None:
        if check:
            for r, p in enumerate(parts[1:], 1):
                if p.shape != parts[0].shape or not torch.equal(p, parts[0]):
                    raise CheckpointError(f"{name}: replicated tensor differs on TP rank {r}")
        return parts[0]
    dim, stride = split
    if dim >= parts[0].dim():
        dim = 0
    out = merge_partitions(parts, dim, stride) if len(parts) > 1 else parts[0]
    if kind == "vocab":
        out = out[: cfg.vocab_size]
    return out


def shard_dict(full: dict[str, Tensor], cfg: ModelConfig, tp: int, tp_rank: int) -> dict:
    return {k: shard_tensor(k, v, cfg, tp, tp_rank) for k, v in full.items()}


def merge_dicts(shards: list[dict[str, Tensor]], cfg: ModelConfig) -> dict[str, Tensor]:
    keys = list(shards[0])
    for r, s in enumerate(shards[1:], 1):
        if list(s) != keys:
            diff = sorted(set(s) ^ set(keys))
            raise CheckpointError(f"TP rank {r} holds different keys than rank 0: {diff[:5]}")
    return {k: merge_tensor(k, [s[k] for s in shards], cfg) for k in keys}


# ---- layer groups: the unit of streaming ------------------------------------------------------


def layer_groups(cfg: ModelConfig) -> list[str]:
    """Streaming units in pipeline order: ``embedding``, ``layers.0`` .. ``final_norm`` (and
    ``output_layer`` when untied)."""
    groups = ["embedding"] + [f"layers.{i}" for i in range(cfg.num_layers)] + ["final_norm"]
    return groups + ([] if cfg.tied else ["output_layer"])


def group_of(name: str) -> str:
    if name.startswith("layers."):
        return ".".join(name.split(".")[:2])
    return name.split(".")[0]


def group_names(group: str, cfg: ModelConfig) -> list[str]:
    return [n for n in expected_names(cfg) if group_of(n) == group]


def pipe_index(group: str, cfg: ModelConfig) -> int:
    """Index of ``group`` in the pipeline layer list (0 embedding, 1..L blocks, L+1 norm)."""
    if group == "embedding":
        return 0
    if group == "final_norm":
        return cfg.num_layers + 1
    if group == "output_layer":
        return cfg.num_layers + 2
    return int(group.split(".")[1]) + 1


def to_local(name: str) -> str:
    """GPTModel name -> the name inside its pipeline layer (``layers.3.ln_1.weight`` -> ``ln_1.weight``)."""
    g = group_of(name)
    return name[len(g) + 1 :]
