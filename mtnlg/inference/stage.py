"""One pipeline stage of a GPT for inference: its modules, built and loaded without DeepSpeed.

The stage holds the pipeline indices DeepSpeed's ``type:TransformerBlock`` partition gives it
(0 embedding, 1..L blocks, L+1 final norm, L+2 the output layer: the embedding when tied, an
``OutputLayer`` when untied), built from the training modules with this rank's TP shard of each
weight. Parameter names are ``GPTModel``'s (``layers.3.ln_1.weight``, ``output_layer.weight``).

Weights come from, in order of preference:

* an mtnlg checkpoint saved at this very TP x PP: only this rank's own files are read
  (``torch.load(weights_only=True, mmap=True)``), and only they are hashed against the
  checkpoint's manifest (every file's presence and size is checked);
* an mtnlg checkpoint at another layout: each of the stage's layer groups is merged from all
  saved TP shards and re-cut for this rank (``mtnlg.checkpoint`` rules);
* a Hugging Face folder (``config.json``: GPT-2, Llama, Mistral, Qwen2): through the
  converter's reader.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mtnlg.checkpoint import rules
from mtnlg.checkpoint.rules import CheckpointError
from mtnlg.config import ModelConfig
from mtnlg.model.layers import FinalLayerNorm, GPTEmbedding, OutputLayer, TransformerBlock


class StageModel(nn.Module):
    """The modules of pipeline stage ``stage`` of ``pp`` (all of them when pp == 1)."""

    def __init__(self, cfg: ModelConfig, tp_group=None, stage: int = 0, pp: int = 1):
        super().__init__()
        from mtnlg.checkpoint.deepspeed_layout import stage_bounds

        self.cfg = cfg
        bounds = stage_bounds(cfg, pp)
        self.lo, self.hi = bounds[stage], bounds[stage + 1]  # pipeline indices [lo, hi)
        n = cfg.num_layers
        self.has_input = self.lo == 0
        self.has_head = self.hi == n + 3  # the output layer, L+2, is always last
        self.has_final_norm = self.lo <= n + 1 < self.hi
        self.layer_ids = [i for i in range(n) if self.lo <= i + 1 < self.hi]
        # The embedding serves as input (first stage) and, when tied, as the output layer
        # (last stage); an untied model has its own output layer there instead.
        emb = self.has_input or (self.has_head and cfg.tied)
        self.embedding = GPTEmbedding(cfg, tp_group) if emb else None
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, tp_group) for i in self.layer_ids}
        )
        self.final_norm = FinalLayerNorm(cfg) if self.has_final_norm else None
        untied = self.has_head and not cfg.tied
        self.output_layer = OutputLayer(cfg, tp_group) if untied else None

    def groups(self) -> list[str]:
        """The checkpoint layer groups this stage needs."""
        g = ["embedding"] if self.embedding is not None else []
        g += [f"layers.{i}" for i in self.layer_ids]
        g += ["final_norm"] if self.final_norm is not None else []
        return g + (["output_layer"] if self.output_layer is not None else [])

    def head_logits(self, hidden: torch.Tensor, mask_padding: bool = True) -> torch.Tensor:
        """hidden (..., h) -> this rank's vocabulary shard of the logits (..., V/tp), padding
        columns at -inf (last stage only): the untied output layer, else the embedding."""
        head = self.output_layer if self.output_layer is not None else self.embedding
        return head.lm_logits(hidden, mask_padding=mask_padding)


def _own_files_state(ckpt, groups: list[str], tp_rank: int, stage: int) -> dict:
    """This rank's tensors read straight from its own DeepSpeed files (same TP x PP)."""
    from mtnlg.checkpoint.deepspeed_layout import layer_file, model_file

    state = {}
    if ckpt.pp == 1:
        path = model_file(ckpt.dir, stage * ckpt.tp + tp_rank)
        module = ckpt.read(path).get("module")
        if not isinstance(module, dict):
            raise CheckpointError(f"{path}: no 'module' state dict")
        for g in groups:
            for n in rules.group_names(g, ckpt.cfg):
                if n not in module:
                    raise CheckpointError(f"{path}: missing key {n}")
                state[n] = module[n]
        return state
    for g in groups:
        path = layer_file(ckpt.dir, rules.pipe_index(g, ckpt.cfg), tp_rank)
        local = ckpt.read(path)
        for n in rules.group_names(g, ckpt.cfg):
            key = rules.to_local(n)
            if key not in local:
                raise CheckpointError(f"{path}: missing key {key}")
            state[n] = local[key]
    return state


def load_stage(
    path: str | Path,
    *,
    tp_group=None,
    stage: int = 0,
    pp: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[ModelConfig, StageModel, object | None]:
    """(config, this rank's ``StageModel`` in eval mode, tokenizer or None) from ``path``."""
    tp = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    tp_rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
    p = Path(path)
    if (p / "config.json").is_file():
        from mtnlg.checkpoint import load_full_state

        cfg, full, tokenizer = load_full_state(p)
        _check_layout(cfg, tp, pp, path)
        model = stage_from_full(cfg, full, tp_group=tp_group, stage=stage, pp=pp)
        return cfg, model.to(device=device, dtype=dtype), tokenizer
    from mtnlg.checkpoint.integrity import IntegrityError

    try:
        cfg, model, tokenizer = _mtnlg_stage(path, tp_group, tp, tp_rank, stage, pp)
    except IntegrityError as e:  # a bad hash: seen only by the ranks that read the file
        raise SystemExit(f"error: --load {path}: {e}") from None
    return cfg, model.to(device=device, dtype=dtype), tokenizer


def _mtnlg_stage(path: str | Path, tp_group, tp: int, tp_rank: int, stage: int, pp: int):
    """(config, fp32 ``StageModel``, tokenizer) from an mtnlg checkpoint: every file's presence
    and size checked, and the SHA-256 of each file read (this stage's, at the same TP x PP)."""
    from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint

    ckpt = DSCheckpoint(path)
    cfg, tokenizer = ckpt.cfg, ckpt.tokenizer()
    _check_layout(cfg, tp, pp, path)
    model = _empty_stage(cfg, tp_group, stage, pp)
    if (ckpt.tp, ckpt.pp) == (tp, pp):
        state = _own_files_state(ckpt, model.groups(), tp_rank, stage)
    else:  # one layer group at a time merged from all saved shards and re-cut
        state = {}
        for g in model.groups():
            state.update(rules.shard_dict(ckpt.full_group(g), cfg, tp, tp_rank))
    _load(model, state)
    return cfg, model, tokenizer


def stage_from_full(
    cfg: ModelConfig, full: dict, *, tp_group=None, stage: int = 0, pp: int = 1
) -> StageModel:
    """This rank's fp32 ``StageModel`` in eval mode cut from a full state (a ``GPTModel`` state
    dict at TP=1, vocabulary unpadded: ``load_full_state``'s or ``merge_state``'s)."""
    tp = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    tp_rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
    model = _empty_stage(cfg, tp_group, stage, pp)
    names = [n for g in model.groups() for n in rules.group_names(g, cfg)]
    _load(model, {n: rules.shard_tensor(n, full[n], cfg, tp, tp_rank) for n in names})
    return model


def _empty_stage(cfg: ModelConfig, tp_group, stage: int, pp: int) -> StageModel:
    from mtnlg.tensor_parallel import skip_init

    cfg.hidden_dropout = cfg.attention_dropout = 0.0
    with skip_init():  # weights overwritten by _load: no draws, only this rank's shards
        return StageModel(cfg, tp_group, stage, pp)


def _load(model: StageModel, state: dict) -> None:
    model.load_state_dict({n: t.to(torch.float32) for n, t in state.items()}, strict=True)
    model.requires_grad_(False)
    model.eval()


def _check_layout(cfg: ModelConfig, tp: int, pp: int, path) -> None:
    from mtnlg.checkpoint.convert import check_layout

    try:
        check_layout(cfg, tp, pp)
    except CheckpointError as e:
        raise SystemExit(f"error: --load {path}: {e}") from None
