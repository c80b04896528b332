"""The three conversions, streaming one layer group at a time, written to a temp folder first.

* ``mtnlg_to_hf``: any TP/PP checkpoint -> ``GPT2LMHeadModel`` or Llama-family folder
  (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``; safetensors shards).
* ``hf_to_mtnlg``: HF folder of those -> weights-only mtnlg checkpoint at (tp, pp).
* ``reshard``: mtnlg checkpoint -> another (tp, pp, dp), optimizer state included when present.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from mtnlg.checkpoint import integrity, rules
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


def drop_optimizer_state(ckpt: DSCheckpoint, weights_only: bool, why: str) -> None:
    """Refuse to lose ``ckpt``'s optimizer state unless ``weights_only``; then say so loudly."""
    held = (
        f"optimizer state ({ckpt.optim_prefix}_pp_rank_* files: fp32 master weights + Adam moments)"
        if ckpt.has_optimizer
        else ckpt.uncarried_optimizer()
    )
    if held is None:
        return
    if not weights_only:
        raise CheckpointError(
            f"{ckpt.dir} holds {held}, which {why}; pass --weights-only to write the weights "
            "without it (training would restart the optimizer)"
        )
    print(f"warning: --weights-only: dropping the {held} of {ckpt.dir}", file=sys.stderr)


def mtnlg_to_hf(
    input: str,
    output: str,
    tag: str | None = None,
    dtype=torch.float32,
    max_shard_bytes=2**30,
    weights_only: bool = False,
) -> ModelConfig:
    """Any TP/PP checkpoint -> HF folder (architecture: ``hf.export_architecture``). A Hugging
    Face folder holds weights only: a checkpoint with optimizer state needs
    ``weights_only=True`` (``--weights-only``)."""
    from mtnlg.checkpoint.classification import export_classifier, is_classifier
    from mtnlg.checkpoint.hf import (
        HFShardWriter,
        hf_config_dict,
        hf_plan,
        to_hf_tensors,
        write_hf_tokenizer,
    )

    if is_classifier(input, tag):  # finetune.py's classifiers: GPT2ForSequenceClassification
        return export_classifier(input, output, tag, dtype, weights_only)
    ckpt = DSCheckpoint(input, tag)
    ckpt.verify_all()  # every file's SHA-256 before anything is written
    drop_optimizer_state(ckpt, weights_only, "a Hugging Face folder cannot hold")
    cfg, tokenizer = ckpt.cfg, ckpt.tokenizer()
    with atomic_output(output) as tmp:
        writer = HFShardWriter(tmp, hf_plan(cfg), dtype, max_shard_bytes)
        for group in rules.layer_groups(cfg):
            for name, full in ckpt.iter_full_group(group):  # one merged tensor at a time
                for hf_name, t in to_hf_tensors(name, full, cfg):
                    writer.add(hf_name, t)
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
    integrity.write_local_manifest(d, tag)
    (tmp / "latest").write_text(tag + "\n")


def hf_to_mtnlg(
    input: str, output: str, tp: int, pp: int, make_vocab_size_divisible_by: int = 128
) -> ModelConfig:
    from mtnlg.checkpoint.hf import HFReader, config_from_hf, read_hf_tokenizer

    reader = HFReader(input)
    cfg = config_from_hf(reader.config, make_vocab_size_divisible_by)
    if reader.dequantizer is not None:  # the mtnlg checkpoint holds scale * q in fp32
        print(f"{input}: {reader.dequantizer.summary()}", file=sys.stderr, flush=True)
    check_layout(cfg, tp, pp)
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
        writer.finish()
        meta = new_model_meta(cfg, tp, pp, {"huggingface": str(Path(input).resolve())})
        _write_root(tmp, tag, meta, tokenizer)
    return cfg


def new_model_meta(cfg: ModelConfig, tp: int, pp: int, source: dict) -> dict:
    """The metadata of a weights-only checkpoint of a new model (iteration 0, no training
    state): a Hugging Face import, a pruned model."""
    return {
        "model": cfg.to_dict(),
        "parallel": {"tp": tp, "pp": pp, "dp": 1},
        "train": {},
        "progress": {"iteration": 0, "consumed_samples": 0, "consumed_tokens": 0},
        "weights_only": True,
        "source": source,
    }


def reshard(
    input: str,
    output: str,
    tp: int,
    pp: int,
    dp: int | None = None,
    tag: str | None = None,
    weights_only: bool = False,
) -> ModelConfig:
    """Another (tp, pp, dp): weights, and ZeRO-1/2 optimizer state in either of DeepSpeed's
    formats (fp32/fp16 ``zero_*``, bf16 ``bf16_zero_*`` incl. BF16_Optimizer). Optimizer state
    that cannot be carried is refused unless ``weights_only`` (``--weights-only``).

    Streams: source layer groups are read in pipeline order, and each target stage's files are
    written (and its optimizer shards dropped) when its last group arrives, so the memory held
    is about one target stage's optimizer state, not the model's. Every tensor keeps its saved
    dtype (bf16 weights stay bf16; fp32 masters and moments stay fp32)."""
    ckpt = DSCheckpoint(input, tag)
    ckpt.verify_all()  # every file's SHA-256 before anything is written
    cfg = ckpt.cfg
    check_layout(cfg, tp, pp)
    dp = dp or ckpt.dp
    with_opt = ckpt.has_optimizer and not weights_only
    if not with_opt:
        drop_optimizer_state(ckpt, weights_only, "this reshard cannot carry")
    out_tag = ckpt.meta["tag"]
    with atomic_output(output) as tmp:
        common = ckpt.optimizer_common() if with_opt else None
        eng = ckpt.engine_state()
        # dtype None: every tensor keeps its saved dtype
        writer = DSWriter(tmp / out_tag, cfg, tp, pp, dp, None, eng, optimizer=common)
        for group in rules.layer_groups(cfg):
            full = ckpt.full_group(group, keep_dtype=True)
            opt = ckpt.optimizer_group(group) if with_opt else None
            writer.write_group(group, full, opt)
            del full, opt
        writer.finish()
        meta = {k: v for k, v in ckpt.meta.items() if k not in ("format_version", "tag")}
        meta["parallel"] = {"tp": tp, "pp": pp, "dp": dp}
        meta["weights_only"] = not with_opt
        _write_root(tmp, out_tag, meta, ckpt.tokenizer())
    return cfg


def check_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    """``cfg`` can be split TP x PP ways (heads, hidden, vocabulary, FFN, layers); else CheckpointError."""
    from mtnlg.distributed.topology import ParallelConfigError, ParallelDims

    try:
        ParallelDims(world_size=tp * pp, tp=tp, pp=pp).validate_config(cfg)
    except ParallelConfigError as e:
        raise CheckpointError(str(e)) from None
    if cfg.ffn_hidden_size % tp:
        raise CheckpointError(f"ffn_hidden_size {cfg.ffn_hidden_size} not divisible by TP {tp}")
    g = cfg.kv_groups
    if cfg.num_query_groups is not None and g % tp and tp % g:
        raise CheckpointError(
            f"--num-query-groups {g} and TP {tp}: one must divide the other (KV groups are "
            "split over TP ranks, or each shared by TP/groups ranks)"
        )
