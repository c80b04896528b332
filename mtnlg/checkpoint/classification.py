"""Classifier checkpoints (``finetune.py --task classification``): read, load, export to HF.

A classifier checkpoint is an mtnlg checkpoint whose metadata holds ``"classification":
{"labels": [...], "pad_token_id": N}`` and whose model carries the head ``score.weight`` (C, h),
replicated over TP: at PP=1 inside each ``mp_rank_*_model_states.pt`` module, at PP>1 as
pipeline layer L+2 (``layer_{L+2}-model_{tp}-model_states.pt``, key ``score.weight``) where the
LM's tied head would be. The export is a ``GPT2ForSequenceClassification`` folder: the GPT-2
tensors of ``hf_plan`` plus ``score.weight``, ``id2label`` / ``label2id`` / ``pad_token_id``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from mtnlg.checkpoint import rules
from mtnlg.checkpoint.deepspeed_layout import (
    DSCheckpoint,
    engine_name,
    layer_file,
    model_file,
)
from mtnlg.checkpoint.rules import CheckpointError
from mtnlg.config import ModelConfig
from mtnlg.model.classification import HEAD


class ClassifierCheckpoint(DSCheckpoint):
    """``DSCheckpoint`` that also knows the classification head and the label set."""

    def __init__(self, path: str | Path, tag: str | None = None):
        super().__init__(path, tag)
        info = self.meta.get("classification")
        if not info:
            raise CheckpointError(f"{self.dir}: not a classifier checkpoint (no 'classification')")
        self.labels: list[str] = list(info["labels"])
        self.pad_token_id: int = int(info["pad_token_id"])

    def _expected_files(self) -> set[str]:
        want = super()._expected_files()
        if self.pp > 1:
            idx = self.cfg.num_layers + 2
            want |= {layer_file(self.dir, idx, r).name for r in range(self.tp)}
        return want

    @property
    def _groups(self) -> set[str]:
        return super()._groups | {"score"}

    def head(self) -> Tensor:
        """The full (C, h) fp32 head; the TP replicas must agree."""
        parts = []
        for r in range(self.tp):
            if self.pp == 1:
                path = model_file(self.dir, r)
                sd = self.read(path).get("module") or {}
            else:
                path = layer_file(self.dir, self.cfg.num_layers + 2, r)
                sd = self.read(path)
            if HEAD not in sd:
                raise CheckpointError(f"{path}: no {HEAD} (classification head)")
            parts.append(sd[HEAD].float().clone())
        head = rules.merge_tensor(HEAD, parts, self.cfg)
        if tuple(head.shape) != (len(self.labels), self.cfg.hidden_size):
            raise CheckpointError(
                f"{self.dir}: {HEAD} has shape {tuple(head.shape)}, expected "
                f"({len(self.labels)} labels, {self.cfg.hidden_size})"
            )
        return head

    def full_state(self) -> dict[str, Tensor]:
        """Every tensor at TP=1 x PP=1 (fp32, vocabulary unpadded), the head included."""
        full = {}
        for group in rules.layer_groups(self.cfg):
            full.update(self.full_group(group))
        full[HEAD] = self.head()
        return full


def is_classifier(path: str | Path, tag: str | None = None) -> bool:
    """Whether ``path`` is an mtnlg checkpoint written by the classification fine-tuning."""
    from mtnlg.checkpoint.deepspeed_layout import resolve_dir

    p = Path(path)
    if (p / "config.json").is_file():
        return False
    meta = json.loads((resolve_dir(p, tag) / "mtnlg_meta.json").read_text())
    return bool(meta.get("classification"))


def export_classifier(
    input: str,
    output: str,
    tag: str | None = None,
    dtype: torch.dtype = torch.float32,
    weights_only: bool = False,
) -> ModelConfig:
    """A classifier checkpoint (any TP/PP) -> ``GPT2ForSequenceClassification`` folder, written
    to a temp folder and renamed (``convert.mtnlg_to_hf`` hands classifier checkpoints here)."""
    from mtnlg.checkpoint.convert import atomic_output, drop_optimizer_state

    ckpt = ClassifierCheckpoint(input, tag)
    ckpt.verify_all()  # every file's SHA-256 before anything is written
    drop_optimizer_state(ckpt, weights_only, "a Hugging Face folder cannot hold")
    with atomic_output(output) as tmp:
        export_hf_classifier(
            ckpt.cfg,
            ckpt.full_state(),
            ckpt.labels,
            ckpt.pad_token_id,
            ckpt.tokenizer(),
            tmp,
            dtype,
        )
    return ckpt.cfg


def engine_param_name(name: str, cfg: ModelConfig, pp: int) -> str:
    """Full-state name -> the engine module's parameter name (pipeline names when PP > 1)."""
    if name == HEAD:
        return HEAD if pp == 1 else f"{cfg.num_layers + 2}.{HEAD}"
    return engine_name(name, cfg, pp)


def load_into_stage(module: torch.nn.Module, full: dict[str, Tensor], cfg: ModelConfig, topo):
    """Copy this (TP rank, PP stage)'s shard of ``full`` into ``module`` (``GPTModel``,
    ``GPTClassifier`` or their pipeline forms); every parameter must be covered."""
    params = dict(module.named_parameters())
    loaded = set()
    for name, t in full.items():
        key = engine_param_name(name, cfg, topo.pp)
        if key not in params:
            continue  # another stage's
        shard = rules.shard_tensor(name, t, cfg, topo.tp, topo.tp_rank)
        if shard.shape != params[key].shape:
            raise CheckpointError(
                f"{name}: shape {tuple(shard.shape)} does not fit the model's {params[key].shape}"
            )
        with torch.no_grad():
            params[key].copy_(shard)
        loaded.add(key)
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"no weights for {missing[:4]} in the loaded state")


def export_hf_classifier(
    cfg: ModelConfig,
    full: dict[str, Tensor],
    labels: list[str],
    pad_token_id: int,
    tokenizer,
    out: Path,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write a ``GPT2ForSequenceClassification`` folder into ``out`` (an existing, empty temp
    folder: the caller renames it into place)."""
    if not cfg.gpt2_compatible:
        raise CheckpointError(
            "only GPT-2-architecture classifiers export (GPT2ForSequenceClassification); this "
            "one has Llama-family options (RoPE/RMSNorm/SwiGLU/GQA/untied/no biases)"
        )
    from mtnlg.checkpoint.hf import (
        HFShardWriter,
        hf_config_dict,
        hf_plan,
        to_hf_tensor,
        write_hf_tokenizer,
    )

    head = full[HEAD]
    plan = hf_plan(cfg) + [(HEAD, HEAD, tuple(head.shape))]
    writer = HFShardWriter(out, plan, dtype, max_shard_bytes=2**30)
    for name in rules.expected_names(cfg):
        rules.check_full(name, full[name], cfg)
        writer.add(*to_hf_tensor(name, full[name]))
    writer.add(HEAD, head)
    writer.close()
    conf = hf_config_dict(cfg, getattr(tokenizer, "eod", None), dtype)
    conf.update(
        architectures=["GPT2ForSequenceClassification"],
        id2label={str(i): label for i, label in enumerate(labels)},
        label2id={label: i for i, label in enumerate(labels)},
        pad_token_id=pad_token_id,
    )
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    # batches are right-padded with the pad id: the tokenizer files say which token
    write_hf_tokenizer(tokenizer, out, cfg, pad_token_id)
