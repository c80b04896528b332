"""Sequence classification on the GPT: Hugging Face ``GPT2ForSequenceClassification``'s head.

``score`` is a bias-free ``Linear(h, num_labels)`` applied to the final hidden state of every
position; a sequence's logits are those at its last non-pad token (the rightmost position whose
id is not the pad id, exactly as ``GPT2ForSequenceClassification`` picks it), so the model
exports to that class weight for weight. The hidden state is replicated over TP, so the head is
a replicated parameter like the LayerNorms.

Targets travel as one (b, 2) int64 tensor ``[label, last_index]``: one tensor passes through the
training loop and, at PP > 1, DeepSpeed's pipeline engine delivers it to the last stage, where
the loss needs the index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.config import ModelConfig
from mtnlg.model.gpt import GPTModel, seed_everything
from mtnlg.model.layers import normal_init

HEAD = "score.weight"
"""Name of the head's weight in the full state dict and in Hugging Face (``score.weight``)."""


def last_token_index(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(b, s) ids -> (b,) index of the rightmost non-pad token (0 if all are pad), as HF does."""
    non_pad = (input_ids != pad_id).to(torch.int64)  # (b, s)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * non_pad).argmax(-1)


def pooled(logits: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(b, s, C) logits at every position, (b,) indices -> (b, C)."""
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


def score_layer(cfg: ModelConfig, num_labels: int) -> nn.Linear:
    """``score``: (b, s, h) -> (b, s, C), replicated over TP; normal(0, init_method_std) init."""
    score = nn.Linear(cfg.hidden_size, num_labels, bias=False)
    normal_init(cfg.init_method_std)(score.weight)
    return score


class ClassificationHead(nn.Module):
    """The head as a pipeline layer (its state dict key is ``score.weight``, as in HF)."""

    def __init__(self, cfg: ModelConfig, num_labels: int):
        super().__init__()
        self.score = score_layer(cfg, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden)  # (b, s, h) -> (b, s, C)


class ClassificationLoss(nn.Module):
    """Mean cross-entropy of the pooled logits; targets (b, 2) ``[label, last_index]``."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # logits: (b, s, C); targets: (b, 2) int64
        return F.cross_entropy(pooled(logits, targets[:, 1]).float(), targets[:, 0])


class GPTClassifier(GPTModel):
    """``GPTModel``'s embedding and blocks with ``ClassificationHead`` instead of the LM head.

    Seeds: the head is built after seeding ``seed + num_layers + 2``, the index of the head in
    the pipeline form (``PipelineModule(seed_layers=True)`` seeds layer i with seed + i), so for
    one seed both forms start from the same weights whatever the TP/PP layout.
    """

    def __init__(self, cfg: ModelConfig, num_labels: int, tp_group=None, seed: int = 1234):
        super().__init__(cfg, tp_group=tp_group, seed=seed)
        self.output_layer = None  # an untied LM head is replaced too (as in the pipeline form)
        seed_everything(seed + cfg.num_layers + 2)
        self.score = score_layer(cfg, num_labels)
        self.class_loss = ClassificationLoss()

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None):
        """(b, s) ids -> logits (b, s, C) at every position, or with targets the mean loss."""
        logits = self.score(self.hidden_states(input_ids))  # (b, s, C)
        if targets is None:
            return logits
        return self.class_loss(logits, targets)
