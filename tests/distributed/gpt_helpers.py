"""Shared pieces of the GPT model tests: a tiny config, batches, shard gathering."""

from __future__ import annotations

import torch

from mtnlg.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=16,
        vocab_size=500,
        make_vocab_size_divisible_by=8,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def batches(cfg: ModelConfig, n: int, micro_batch: int, seed: int = 0):
    """n micro-batches of (input_ids, labels), each (micro_batch, s) int64."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_length + 1), generator=g)
        out.append((text[:, :-1].contiguous(), text[:, 1:].contiguous()))
    return out


def gather_param(p: torch.Tensor, group, value: torch.Tensor | None = None) -> torch.Tensor:
    """Full tensor of a TP-sharded parameter from its shards (or of ``value``, e.g. its grad,
    sharded like it); replicated ones as is."""
    from mtnlg.tensor_parallel.layers import merge_partitions

    value = (p if value is None else value).detach()
    if group is None or not getattr(p, "tensor_model_parallel", False):
        return value.clone()
    parts = [torch.empty_like(value) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, value.contiguous(), group=group)
    return merge_partitions(parts, dim=p.partition_dim, stride=getattr(p, "partition_stride", 1))


def gather_grad(p: torch.nn.Parameter, group) -> torch.Tensor:
    return gather_param(p, group, p.grad)
