"""The student: a ``GPTModel`` whose training forward returns the distillation loss.

It keeps ``GPTModel``'s parameter names, so DeepSpeed's engine, ZeRO 0-3, ``loop.train`` and
checkpointing work unchanged and a saved student is an ordinary mtnlg GPT checkpoint. The
teacher is held as a plain attribute (not a registered submodule): its parameters are in
neither the optimizer nor the student's checkpoints, and DeepSpeed never casts or shards it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtnlg.config import ModelConfig
from mtnlg.distillation.kd_loss import KD_MODES, distillation_loss
from mtnlg.model import GPTModel


@dataclass(frozen=True)
class KDConfig:
    """How the student learns from the teacher."""

    temperature: float = 1.0
    """Softmax temperature T of both distributions (``--kd-temperature``); the KL is scaled by T²."""
    alpha: float = 0.5
    """Weight of the KL term; ``1 - alpha`` weighs the LM cross-entropy (``--kd-alpha``)."""
    mode: str = "forward-kl"
    """``forward-kl`` = KL(teacher || student), ``reverse-kl`` = KL(student || teacher)."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"--kd-temperature must be > 0 (got {self.temperature})")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--kd-alpha must be in [0, 1] (got {self.alpha})")
        if self.mode not in KD_MODES:
            raise ValueError(f"--kd-loss {self.mode!r}: choose one of {', '.join(KD_MODES)}")


class DistillStudent(GPTModel):
    """In training mode with labels: ``alpha * T² KL + (1 - alpha) * CE``; in eval mode: CE.

    Evaluation therefore reports the student's own held-out LM loss (perplexity), comparable
    with a cross-entropy-only run.
    """

    def __init__(self, cfg: ModelConfig, tp_group=None, seed: int = 1234, kd: KDConfig = None):
        super().__init__(cfg, tp_group=tp_group, seed=seed)
        self.kd = kd or KDConfig()
        object.__setattr__(self, "_teacher", None)  # plain attribute: not a submodule
        self.last_terms: tuple[torch.Tensor, torch.Tensor | None] | None = None
        """(cross-entropy, KL) of the last training forward, for logging."""

    @property
    def teacher(self) -> GPTModel | None:
        return self._teacher

    def attach_teacher(self, teacher: GPTModel) -> None:
        """Hold ``teacher`` (frozen, eval, same TP group and vocabulary) without registering it."""
        if teacher.cfg.padded_vocab_size() != self.cfg.padded_vocab_size() or (
            teacher.cfg.vocab_size != self.cfg.vocab_size
        ):
            raise ValueError(
                f"teacher vocabulary {teacher.cfg.vocab_size} != student {self.cfg.vocab_size}"
            )
        teacher.requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher.eval())

    def forward(self, input_ids: torch.Tensor, labels=None) -> torch.Tensor:
        hidden = self.hidden_states(input_ids)  # (b, s, h)
        if labels is None:
            return self.head_logits(hidden)  # (b, s, V/tp), padding columns at -inf
        # both losses exclude the vocabulary padding themselves and work in the logits buffer
        logits = self.head_logits(hidden, mask_padding=False)  # (b, s, V/tp)
        if not self.training or self.kd.alpha == 0.0:
            return self.loss_fn(logits, labels, inplace=True)
        if self._teacher is None:
            raise RuntimeError("DistillStudent: no teacher attached (attach_teacher)")
        labels, loss_mask = labels if isinstance(labels, (tuple, list)) else (labels, None)
        with torch.no_grad():
            teacher_logits = self._teacher(input_ids)  # (b, s, V/tp), eval mode
        loss, ce, kl = distillation_loss(
            logits,
            teacher_logits,
            labels,
            loss_mask,
            self.tp_group,
            temperature=self.kd.temperature,
            alpha=self.kd.alpha,
            mode=self.kd.mode,
            vocab_size=self.cfg.vocab_size,
            inplace=True,
        )
        self.last_terms = (ce, kl)  # detached device tensors: no host sync per step
        return loss
