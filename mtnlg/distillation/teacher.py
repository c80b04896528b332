"""The frozen teacher: loaded through the converter, sharded over the student's TP group.

Any mtnlg checkpoint (any TP/PP it was saved with) or a Hugging Face folder (GPT-2, Llama,
Mistral, Qwen2: whatever the converter reads) is read as a full TP=1 state by ``mtnlg.checkpoint.load_full_state`` and cut into this rank's TP shard, so
each device holds 1/tp of the teacher. The full state passes through host memory once at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtnlg.config import ModelConfig
from mtnlg.model import GPTModel


@dataclass
class Teacher:
    """A frozen ``GPTModel`` shard in eval mode, its config and its tokenizer (if it ships one)."""

    cfg: ModelConfig
    model: GPTModel
    tokenizer: object | None = None

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(b, s) -> this rank's vocab shard of the teacher's logits (b, s, V/tp)."""
        return self.model(input_ids)


def freeze(model: GPTModel) -> GPTModel:
    """No gradients, eval mode (no dropout): the teacher is a fixed function."""
    model.requires_grad_(False)
    return model.eval()


def load_teacher(
    path: str,
    tp_group=None,
    tp: int = 1,
    tp_rank: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Teacher:
    """Load ``path`` (mtnlg checkpoint dir or HF folder) as this TP rank's frozen shard."""
    from mtnlg.checkpoint import CheckpointError, load_full_state, load_into_model
    from mtnlg.tensor_parallel import skip_init

    try:
        cfg, full, tokenizer = load_full_state(path)
    except (CheckpointError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: --teacher {path}: {e}") from None
    cfg.hidden_dropout = cfg.attention_dropout = 0.0
    with skip_init():  # weights loaded just below: no draws, only this rank's shard
        model = GPTModel(cfg, tp_group=tp_group, seed=0)
    load_into_model(model, full, tp, tp_rank)
    del full
    model = freeze(model).to(device=device, dtype=dtype)
    return Teacher(cfg=cfg, model=model, tokenizer=tokenizer)
