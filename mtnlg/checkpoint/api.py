"""The checkpoint API other code imports: full state in, shards out, Hugging Face export.

A *full state* is a ``GPTModel`` state dict at TP=1 in fp32 with the word embedding unpadded
(``vocab_size`` rows), whatever layout it came from.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

from mtnlg.checkpoint import rules
from mtnlg.checkpoint.rules import CheckpointError
from mtnlg.config import ModelConfig


def load_full_state(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor], object | None]:
    """(config, full fp32 state, tokenizer or None) from an mtnlg checkpoint or an HF folder
    (GPT-2, Llama, Mistral or Qwen2; GPT-2 carried as OPT; compressed-tensors W?A16 folders
    dequantized to fp32)."""
    p = Path(path)
    if (p / "config.json").is_file():
        from mtnlg.checkpoint.hf import HFReader, config_from_hf, read_hf_tokenizer

        reader = HFReader(p)
        cfg = config_from_hf(reader.config)
        if reader.dequantizer is not None:  # W?A16 run as fp32 weights holding scale * q
            print(f"{p}: {reader.dequantizer.summary()}", file=sys.stderr, flush=True)
        reader.check_tied_head()
        full = {}
        for group in rules.layer_groups(cfg):
            for n in rules.group_names(group, cfg):
                full[n] = reader.get(n)
                rules.check_full(n, full[n], cfg)
        extra = sorted(set(reader.names()) - set(full))
        if extra:
            raise CheckpointError(f"{p}: tensors beyond the config: {extra[:4]}")
        return cfg, full, read_hf_tokenizer(p)
    from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint

    ckpt = DSCheckpoint(p)
    full = {}
    for group in rules.layer_groups(ckpt.cfg):
        full.update(ckpt.full_group(group))
    return ckpt.cfg, full, ckpt.tokenizer()


def shard_state(full: dict[str, Tensor], cfg: ModelConfig, tp: int, tp_rank: int) -> dict:
    """This TP rank's ``GPTModel`` state dict (vocabulary padded to ``padded_vocab_size(tp)``)."""
    return rules.shard_dict(full, cfg, tp, tp_rank)


def merge_state(shards: list[dict], cfg: ModelConfig) -> dict[str, Tensor]:
    """Inverse of :func:`shard_state` over all TP ranks (rank order); padding dropped."""
    return rules.merge_dicts(shards, cfg)


def load_into_model(model, full: dict[str, Tensor], tp: int, tp_rank: int) -> None:
    """Copy the full state into a ``GPTModel`` built for (tp, tp_rank); strict about keys."""
    model.load_state_dict(shard_state(full, model.cfg, tp, tp_rank), strict=True)


def export_hf(
    cfg: ModelConfig,
    full: dict[str, Tensor],
    tokenizer,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 2**30,
) -> None:
    """Write a Hugging Face folder (config, safetensors, tokenizer) into ``out_dir``:
    ``GPT2LMHeadModel``, or the Llama-family architecture of ``hf.export_architecture(cfg)``."""
    import json

    from mtnlg.checkpoint.hf import (
        HFShardWriter,
        hf_config_dict,
        hf_plan,
        to_hf_tensors,
        write_hf_tokenizer,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = HFShardWriter(out, hf_plan(cfg), dtype, max_shard_bytes)
    for name in rules.expected_names(cfg):
        rules.check_full(name, full[name], cfg)
        for hf_name, t in to_hf_tensors(name, full[name], cfg):
            writer.add(hf_name, t)
    writer.close()
    eod = getattr(tokenizer, "eod", None)
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, eod, dtype), indent=2))
    write_hf_tokenizer(tokenizer, out, cfg)
