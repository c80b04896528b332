"""Where fine-tuning starts: weights, model config and tokenizer, and the model builders.

* ``--load CKPT``: an mtnlg checkpoint at any TP/PP (pretraining, SFT or classification). Its
  **weights only** are read (merged to TP=1 by the converter's reader, then cut for this
  rank): the optimizer state, LR schedule and progress are *not* loaded; fine-tuning starts a
  fresh optimizer at iteration 0. A classifier checkpoint also brings its head and labels.
* ``--hf-model DIR``: a Hugging Face GPT-2 folder, through the converter.
* neither: random initialization from the model flags (``--num-layers`` ... or ``--preset``)
  and a tokenizer from ``--vocab-file``/``--merge-file``.

The weights are copied into the model before ``deepspeed.initialize``, so ZeRO's fp32 master
copies start from them. ZeRO-3 checkpoints are not readable here (partitioned weights).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from mtnlg.config import ModelConfig


@dataclass
class Start:
    cfg: ModelConfig
    tokenizer: object
    full: dict[str, Tensor] | None
    """Full TP=1 fp32 state (None: random initialization)."""
    source: str
    labels: list[str] | None = None
    """The label set of a classifier checkpoint."""
    pad_token_id: int | None = None
    """The pad id of a classifier checkpoint (else the tokenizer's EOD is used)."""


def resolve_start(args) -> Start:
    """Read the starting point named by the flags; SystemExit with a clear message otherwise."""
    from mtnlg.checkpoint import CheckpointError, load_full_state
    from mtnlg.checkpoint.classification import ClassifierCheckpoint, is_classifier
    from mtnlg.data.tokenizer import build_tokenizer
    from mtnlg.training.arguments import model_config_from_args

    path = args.load or args.hf_model
    flag = "--load" if args.load else "--hf-model"
    labels = pad = None
    try:
        if path is None:
            tokenizer = build_tokenizer(
                args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model
            )
            cfg = model_config_from_args(args, tokenizer.vocab_size)
            return Start(_override(cfg, args), tokenizer, None, "random initialization")
        if not Path(path).is_dir():
            raise CheckpointError("no such folder")
        if args.hf_model and not (Path(path) / "config.json").is_file():
            raise CheckpointError("no config.json (not a Hugging Face model folder)")
        if args.load and is_classifier(path):
            ckpt = ClassifierCheckpoint(path)
            cfg, full, tokenizer = ckpt.cfg, ckpt.full_state(), ckpt.tokenizer()
            labels, pad = ckpt.labels, ckpt.pad_token_id
        else:
            cfg, full, tokenizer = load_full_state(path)
    except (CheckpointError, ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {flag} {path}: {e}" if path else f"error: {e}") from None
    if args.vocab_file or args.tokenizer_model:
        tokenizer = build_tokenizer(
            args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model
        )
    if tokenizer is None:
        raise SystemExit(f"error: {flag} {path} ships no tokenizer: give --vocab-file/--merge-file")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise SystemExit(
            f"error: the tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size}"
        )
    return Start(_override(cfg, args), tokenizer, full, f"{flag} {path}", labels, pad)


def _override(cfg: ModelConfig, args) -> ModelConfig:
    """--seq-length and the dropout flags apply to a loaded model too."""
    changes = {}
    for name in ("seq_length", "hidden_dropout", "attention_dropout"):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    seq = changes.get("seq_length", cfg.seq_length)
    if seq > cfg.max_position_embeddings:
        raise SystemExit(
            f"error: --seq-length {seq} exceeds the model's {cfg.max_position_embeddings} positions"
        )
    return dataclasses.replace(cfg, **changes)


def model_builder(start: Start, num_labels: int | None):
    """``build_engine``'s ``build_model``: the GPT (``num_labels`` None) or the classifier, in
    plain or pipeline form, with ``start``'s weights copied in (a new head when it has none)."""

    def build(cfg: ModelConfig, topo, seed: int, checkpoint_activations: bool):
        from mtnlg.tensor_parallel import skip_init

        if start.full is None:
            return _build(cfg, topo, seed, checkpoint_activations)
        with skip_init():  # the start's weights are copied in: the backbone is not drawn
            return _build(cfg, topo, seed, checkpoint_activations)

    def _build(cfg: ModelConfig, topo, seed: int, checkpoint_activations: bool):
        import deepspeed
        from deepspeed.pipe import LayerSpec

        from mtnlg.checkpoint.classification import load_into_stage
        from mtnlg.model.classification import (
            HEAD,
            ClassificationHead,
            ClassificationLoss,
            GPTClassifier,
        )
        from mtnlg.model.pipe import GPTPipe
        from mtnlg.training.setup import build_gpt

        if num_labels is None:
            model = build_gpt(cfg, topo, seed, checkpoint_activations)
        elif topo.pp > 1:
            model = GPTPipe(
                cfg,
                topo,
                seed=seed,
                activation_checkpoint_interval=1 if checkpoint_activations else 0,
                head=LayerSpec(ClassificationHead, cfg, num_labels),
                loss_fn=ClassificationLoss(),
            )
        else:
            model = GPTClassifier(cfg, num_labels, tp_group=topo.tp_group, seed=seed)
            if checkpoint_activations:
                model.checkpoint_fn = deepspeed.checkpointing.checkpoint
        if start.full is not None:
            full = start.full
            if num_labels is not None and HEAD not in full:  # a new head: keep its init
                full = {**full, HEAD: _own_head(model, cfg, topo)}
            if num_labels is None:
                full = {k: v for k, v in full.items() if k != HEAD}
            load_into_stage(model, full, cfg, topo)
        return model

    return build


def _own_head(model, cfg: ModelConfig, topo):
    """The freshly initialized head (replicated), or a placeholder on stages without it."""
    from mtnlg.checkpoint.classification import engine_param_name
    from mtnlg.model.classification import HEAD

    params = dict(model.named_parameters())
    key = engine_param_name(HEAD, cfg, topo.pp)
    return params[key].detach().clone() if key in params else None
