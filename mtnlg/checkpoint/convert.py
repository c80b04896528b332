"""The three conversions, streaming one layer group at a time, written to a temp folder first.

* ``mtnlg_to_hf``: any TP/PP checkpoint -> ``GPT2LMHeadModel`` folder (safetensors shards).
* ``hf_to_mtnlg``: GPT-2 folder -> weights-only mtnlg checkpoint at (tp, pp).
* ``reshard``: mtnlg checkpoint -> another (tp, pp, dp), optimizer state included when present.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from mtnlg.checkpoint import rules
from mtnlg.checkpoint.deepspeed_layout import META, DSCheckpoint, DSWriter
from mtnlg.checkpoint.rules import CheckpointError
from mtnlg.config import ModelConfig

FORMAT_VERSION = 1


@contextmanager
def atomic_output(output: str | Path):
    """Yield a temp folder beside ``output``; renamed to ``output`` only on success."""
    out = Path(output)
    if out.exists():
        raise CheckpointError(f"--output {out} already exists; refusing to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def mtnlg_to_hf(
    input: str, output: str, tag: str | None = None, dtype=torch.float32, max_shard_bytes=2**30
) -> ModelConfig:
    from mtnlg.checkpoint.hf import (
        HFShardWriter,
        hf_config_dict,
        hf_plan,
        to_hf_tensor,
        write_hf_tokenizer,
    )

    ckpt = DSCheckpoint(input, tag)
    cfg, tokenizer = ckpt.cfg, ckpt.tokenizer()
    with atomic_output(output) as tmp:
        writer = HFShardWriter(tmp, hf_plan(cfg), dtype, max_shard_bytes)
        for group in rules.layer_groups(cfg):
            for name, full in ckpt.iter_full_group(group):  # one merged tensor at a time
                writer.add(*to_hf_tensor(name, full))
                del full
        writer.close()
        eod = getattr(tokenizer, "eod", None)
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, eod, dtype), indent=2))
        write_hf_tokenizer(tokenizer, tmp, cfg)
    return cfg


def _write_root(tmp: Path, tag: str, meta: dict, tokenizer) -> None:
    d = tmp / tag
    if tokenizer is not None:
        tokenizer.save(d / "tokenizer")
    (d / META).write_text(
        json.dumps({"format_version": FORMAT_VERSION, "tag": tag, **meta}, indent=2)
    )
    (tmp / "latest").write_text(tag + "\n")


def hf_to_mtnlg(
    input: str, output: str, tp: int, pp: int, make_vocab_size_divisible_by: int = 128
) -> ModelConfig:
    from mtnlg.checkpoint.hf import HFReader, config_from_hf, read_hf_tokenizer

    reader = HFReader(input)
    cfg = config_from_hf(reader.config, make_vocab_size_divisible_by)
    _check_layout(cfg, tp, pp)
    reader.check_tied_head()
    extra = sorted(set(reader.names()) - set(rules.expected_names(cfg)))
    if extra:
        raise CheckpointError(f"{input}: tensors beyond the config: {extra[:4]}")
    tokenizer = read_hf_tokenizer(Path(input))
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}"
        )
    tag = "iter_0000000"
    with atomic_output(output) as tmp:
        writer = DSWriter(tmp / tag, cfg, tp, pp, dp=1)
        for group in rules.layer_groups(cfg):
            full = {}
            for n in rules.group_names(group, cfg):
                full[n] = reader.get(n)
                rules.check_full(n, full[n], cfg)
            writer.write_group(group, full)
        writer.finish({}, None)
        meta = {
            "model": cfg.to_dict(),
            "parallel": {"tp": tp, "pp": pp, "dp": 1},
            "train": {},
            "progress": {"iteration": 0, "consumed_samples": 0, "consumed_tokens": 0},
            "weights_only": True,
            "source": {"huggingface": str(Path(input).resolve())},
        }
        _write_root(tmp, tag, meta, tokenizer)
    return cfg


def reshard(
    input: str,
    output: str,
    tp: int,
    pp: int,
    dp: int | None = None,
    tag: str | None = None,
    weights_only: bool = False,
) -> ModelConfig:
    ckpt = DSCheckpoint(input, tag)
    cfg = ckpt.cfg
    _check_layout(cfg, tp, pp)
    dp = dp or ckpt.dp
    with_opt = ckpt.has_optimizer and not weights_only
    out_tag = ckpt.meta["tag"]
    with atomic_output(output) as tmp:
        writer = DSWriter(tmp / out_tag, cfg, tp, pp, dp)
        for group in rules.layer_groups(cfg):
            full = ckpt.full_group(group)
            opt = ckpt.optimizer_group(group) if with_opt else None
            writer.write_group(group, full, opt)
        writer.finish(ckpt.engine_state(), ckpt.optimizer_common() if with_opt else None)
        meta = {k: v for k, v in ckpt.meta.items() if k not in ("format_version", "tag")}
        meta["parallel"] = {"tp": tp, "pp": pp, "dp": dp}
        meta["weights_only"] = not with_opt
        _write_root(tmp, out_tag, meta, ckpt.tokenizer())
    return cfg


def _check_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    from mtnlg.distributed.topology import ParallelConfigError, ParallelDims

    try:
        ParallelDims(world_size=tp * pp, tp=tp, pp=pp).validate_model(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            vocab_size=cfg.padded_vocab_size(tp),
        )
    except ParallelConfigError as e:
        raise CheckpointError(str(e)) from None
    if cfg.ffn_hidden_size % tp:
        raise CheckpointError(f"ffn_hidden_size {cfg.ffn_hidden_size} not divisible by TP {tp}")


# ---- verification ----------------------------------------------------------------------------


def _mtnlg_logits(cfg: ModelConfig, full: dict, ids: torch.Tensor) -> torch.Tensor:
    from mtnlg.checkpoint.api import load_into_model
    from mtnlg.model import GPTModel

    model = GPTModel(cfg)
    load_into_model(model, full, 1, 0)
    model.eval()
    return model.full_logits(ids)


def _hf_logits(folder: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


def verify(kind: str, input: str, output: str, n: int = 4, seed: int = 0) -> float:
    """Max |logit difference| between the source and converted models on random sequences."""
    from mtnlg.checkpoint.api import load_full_state

    src_is_hf = kind == "hf-to-mtnlg"
    cfg, full, _ = load_full_state(output if src_is_hf else input)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (n, min(cfg.seq_length, 64)), generator=g)
    ours = _mtnlg_logits(cfg, full, ids)
    if kind == "reshard":
        cfg2, full2, _ = load_full_state(output)
        other = _mtnlg_logits(cfg2, full2, ids)
    else:
        other = _hf_logits(input if src_is_hf else output, ids)
    return float((ours - other).abs().max())
