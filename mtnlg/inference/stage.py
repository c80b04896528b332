"""One pipeline stage of a GPT for inference: its modules, built and loaded without DeepSpeed.

The stage holds the pipeline indices DeepSpeed's ``type:TransformerBlock`` partition gives it
(0 embedding, 1..L blocks, L+1 final norm, L+2 the output layer tied to the embedding), built
from the training modules (``GPTEmbedding``, ``TransformerBlock``, ``FinalLayerNorm``) with this
rank's TP shard of each weight. Parameter names are ``GPTModel``'s (``layers.3.ln_1.weight``).

Weights come from, in order of preference:

* an mtnlg checkpoint saved at this very TP x PP: only this rank's own files are read
  (``torch.load(weights_only=True, mmap=True)``);
* an mtnlg checkpoint at another layout: each of the stage's layer groups is merged from all
  saved TP shards and re-cut for this rank (``mtnlg.checkpoint`` rules);
* a Hugging Face GPT-2 folder (``config.json``): through the converter's reader.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mtnlg.checkpoint import rules
from mtnlg.checkpoint.rules import CheckpointError
from mtnlg.config import ModelConfig
from mtnlg.model.layers import FinalLayerNorm, GPTEmbedding, TransformerBlock


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
        # The embedding serves as input (first stage) and as the tied output layer (last).
        emb = self.has_input or self.has_head
        self.embedding = GPTEmbedding(cfg, tp_group) if emb else None
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, tp_group) for i in self.layer_ids}
        )
        self.final_norm = FinalLayerNorm(cfg) if self.has_final_norm else None

    def groups(self) -> list[str]:
        """The checkpoint layer groups this stage needs."""
        g = ["embedding"] if self.embedding is not None else []
        g += [f"layers.{i}" for i in self.layer_ids]
        return g + (["final_norm"] if self.final_norm is not None else [])


def _own_files_state(ckpt, groups: list[str], tp_rank: int, stage: int) -> dict:
    """This rank's tensors read straight from its own DeepSpeed files (same TP x PP)."""
    from mtnlg.checkpoint.deepspeed_layout import layer_file, model_file, safe_load

    state = {}
    if ckpt.pp == 1:
        path = model_file(ckpt.dir, stage * ckpt.tp + tp_rank)
        module = safe_load(path).get("module")
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
        local = safe_load(path)
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
        ckpt = None
    else:
        from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint

        ckpt = DSCheckpoint(p)
        cfg, tokenizer, full = ckpt.cfg, ckpt.tokenizer(), None
    cfg.hidden_dropout = cfg.attention_dropout = 0.0
    _check_layout(cfg, tp, pp, path)
    model = StageModel(cfg, tp_group, stage, pp)  # weights overwritten just below
    groups = model.groups()
    if ckpt is not None and (ckpt.tp, ckpt.pp) == (tp, pp):
        state = _own_files_state(ckpt, groups, tp_rank, stage)
    else:
        state = {}
        for g in groups:
            merged = full if full is not None else ckpt.full_group(g)
            for n in rules.group_names(g, cfg):
                state[n] = rules.shard_tensor(n, merged[n], cfg, tp, tp_rank)
    state = {n: t.to(torch.float32) for n, t in state.items()}
    model.load_state_dict(state, strict=True)
    del state, full
    model.requires_grad_(False)
    return cfg, model.to(device=device, dtype=dtype).eval(), tokenizer


def _check_layout(cfg: ModelConfig, tp: int, pp: int, path) -> None:
    from mtnlg.checkpoint.convert import check_layout

    try:
        check_layout(cfg, tp, pp)
    except CheckpointError as e:
        raise SystemExit(f"error: --load {path}: {e}") from None
