"""Structured pruning of an mtnlg checkpoint: slice full tensors, write any TP x PP, streaming.

Pure slicing rules on full (TP = 1) ``GPTModel`` tensors, by leaf name (H: kept hidden
channels, A: the kept heads' attention channels, F: kept MLP neurons, all ascending):

=============================================  =====================================
tensor                                          kept
=============================================  =====================================
word / position embeddings, output layer (V, h)  columns H (the vocabulary untouched)
norms, dense / down biases (h,)                 H
``attention.qkv`` ((nh + 2g) hd, h)             rows of the kept heads' q, k, v, cols H
``attention.dense`` (h, nh hd)                  rows H, cols A
``mlp.up`` (f or 2f [gate | up], h)             rows F (of gate and of up), cols H
``mlp.down`` (h, f)                             rows H, cols F
=============================================  =====================================

MHA drops a head's q, k and v rows together; GQA keeps every group's k and v and drops query
heads within the groups (``targets._kept_heads``). The tied word embedding is one tensor, so
the input embedding and the output layer are sliced consistently. Dropped blocks are skipped
and the rest renumbered.

:func:`prune_checkpoint` reads the source one layer group at a time (every TP shard merged by
``DSCheckpoint``), slices it, and hands it to the converter's ``DSWriter`` for the target
TP x PP: the memory held is about one layer, and the output appears only when complete
(``atomic_output``). The result is a **weights-only** checkpoint (no optimizer state, iteration
0): training from it starts a new optimizer, as ``distill.py --student-load`` does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

from mtnlg.checkpoint import rules
from mtnlg.compression.targets import PruneTarget
from mtnlg.config import ModelConfig


def _channels(heads: Tensor, d: int) -> Tensor:
    """Head indices -> their channel indices (head j: j d .. j d + d - 1), in order."""
    return (heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1)


def qkv_rows(cfg: ModelConfig, heads: Tensor | None) -> Tensor | None:
    """Rows of the fused QKV weight that the kept ``heads`` use (None: all of them)."""
    if heads is None:
        return None
    nh, d = cfg.num_attention_heads, cfg.head_dim
    if cfg.num_query_groups is None:  # [q | k | v], each nh d rows
        q = _channels(heads, d)
        return torch.cat([q, nh * d + q, 2 * nh * d + q])
    g = cfg.num_query_groups
    n = nh // g
    blocks = []
    for j in range(g):  # group j: [q of its n heads (n d) | k (d) | v (d)]
        base = j * (n + 2) * d
        local = heads[(heads >= j * n) & (heads < (j + 1) * n)] - j * n
        blocks += [base + _channels(local, d), base + n * d + torch.arange(2 * d)]
    return torch.cat(blocks)


def _take(t: Tensor, dim: int, idx: Tensor | None) -> Tensor:
    return t if idx is None else t.index_select(dim, idx)


def prune_tensor(
    leaf: str, t: Tensor, cfg: ModelConfig, target: PruneTarget, layer: int | None
) -> Tensor:
    """The pruned copy of one full tensor (``leaf``: the name inside its layer group)."""
    H = target.hidden
    heads = None if target.heads is None or layer is None else target.heads[layer]
    F = None if target.ffn is None or layer is None else target.ffn[layer]
    if leaf.endswith(("word_embeddings.weight", "position_embeddings.weight")) or (
        leaf == "weight" and t.dim() == 2
    ):  # embeddings, the untied output layer: (rows, h)
        return _take(t, 1, H)
    if t.dim() == 1 and not leaf.startswith(("attention.qkv", "mlp.up")):
        return _take(t, 0, H)  # norms, dense / down biases
    if leaf.startswith("attention.qkv"):
        t = _take(t, 0, qkv_rows(cfg, heads))
        return _take(t, 1, H) if t.dim() == 2 else t
    if leaf == "attention.dense.weight":
        cols = None if heads is None else _channels(heads, cfg.head_dim)
        return _take(_take(t, 0, H), 1, cols)
    if leaf.startswith("mlp.up"):
        rows = F if F is None or not cfg.swiglu else torch.cat([F, cfg.ffn_hidden_size + F])
        t = _take(t, 0, rows)
        return _take(t, 1, H) if t.dim() == 2 else t
    if leaf == "mlp.down.weight":
        return _take(_take(t, 0, H), 1, F)
    raise ValueError(f"no pruning rule for {leaf!r}")


def source_group(group: str, target: PruneTarget) -> str:
    """The source layer group a target group is cut from (blocks are renumbered)."""
    if group.startswith("layers."):
        return f"layers.{target.layers[int(group.split('.')[1])]}"
    return group


def prune_group(group: str, full: dict[str, Tensor], src: ModelConfig, target: PruneTarget):
    """{target name: pruned tensor} for one target group from its source group's tensors."""
    src_group = source_group(group, target)
    layer = int(src_group.split(".")[1]) if src_group.startswith("layers.") else None
    out = {}
    for name, t in full.items():
        leaf = rules.to_local(name)
        out[f"{group}.{leaf}"] = prune_tensor(leaf, t, src, target, layer).contiguous()
    for name, t in out.items():
        rules.check_full(name, t, target.cfg)
    return out


def prune_checkpoint(
    source: str | Path,
    output: str | Path,
    target: PruneTarget,
    tp: int,
    pp: int,
    check=None,
    extra_meta: dict | None = None,
) -> ModelConfig:
    """Write ``target``'s weights-only checkpoint at ``tp`` x ``pp`` into ``output`` (refused
    if it exists; nothing there unless complete). ``check(name, full)`` sees every source
    tensor read (the scores' fingerprint) and may raise."""
    from mtnlg.checkpoint.convert import _write_root, atomic_output, check_layout, new_model_meta
    from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint, DSWriter

    ckpt = DSCheckpoint(source)
    ckpt.verify_all()  # every file's SHA-256 before anything is written
    cfg = target.cfg
    check_layout(cfg, tp, pp)
    tag = "iter_0000000"
    with atomic_output(output) as tmp:
        writer = DSWriter(tmp / tag, cfg, tp, pp, dp=1, dtype=None)  # keep the saved dtype
        for group in rules.layer_groups(cfg):
            full = ckpt.full_group(source_group(group, target), keep_dtype=True)
            if check is not None:
                for name, t in full.items():
                    check(name, t)
            writer.write_group(group, prune_group(group, full, ckpt.cfg, target))
            del full
        writer.finish()
        source_info = {
            "pruned_from": str(Path(source).resolve()),
            "source_iteration": ckpt.meta.get("progress", {}).get("iteration"),
            "target": target.describe(ckpt.cfg),
            **(extra_meta or {}),
        }
        meta = new_model_meta(cfg, tp, pp, source_info)
        _write_root(tmp, tag, meta, ckpt.tokenizer())
    if ckpt.has_optimizer:
        print(
            f"note: {output} holds weights only: the source's optimizer state is not carried "
            "(a pruned model starts a new optimizer)",
            file=sys.stderr,
        )
    return cfg
