"""GPT as a plain ``nn.Module`` (any TP degree, no pipeline).

It is built from the same layer list, in the same order and with the same per-layer seeds, as the
DeepSpeed pipeline form (``mtnlg.model.pipe``), so for one seed the two forms start from
identical weights whatever the TP/PP layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mtnlg.config import ModelConfig
from mtnlg.model.layers import FinalLayerNorm, GPTEmbedding, OutputLayer, TransformerBlock
from mtnlg.tensor_parallel import gather_from_tp_region, vocab_parallel_cross_entropy


def seed_everything(seed: int) -> None:
    """Seed the default generators (CPU and accelerator) with an int (DeepSpeed's seed_fn)."""
    from deepspeed.accelerator import get_accelerator

    seed = int(seed)
    torch.manual_seed(seed)
    get_accelerator().manual_seed_all(seed)


class GPTLoss(nn.Module):
    """Mean next-token loss from vocab-parallel logits; only (b, s) values cross TP ranks.

    With ``vocab_size`` (the real, unpadded vocabulary) the padding columns of the logits are
    excluded from the softmax here, whatever their value, so callers need not mask them.
    """

    def __init__(self, tp_group=None, vocab_size: int | None = None):
        super().__init__()
        self.tp_group = tp_group
        self.vocab_size = vocab_size

    def forward(self, logits: torch.Tensor, labels, inplace: bool = False) -> torch.Tensor:
        # logits: (b, s, V/tp); labels: (b, s) or ((b, s) labels, (b, s) loss mask)
        # inplace: the logits are a temporary the caller no longer reads (they are overwritten)
        if isinstance(labels, (tuple, list)):
            labels, loss_mask = labels
        else:
            loss_mask = None
        losses = vocab_parallel_cross_entropy(
            logits, labels, self.tp_group, vocab_size=self.vocab_size, inplace=inplace
        )  # (b, s) fp32
        if loss_mask is None:
            return losses.mean()
        loss_mask = loss_mask.to(losses.dtype)
        return (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


class GPTModel(nn.Module):
    """GPT-2 / MT-NLG decoder: embeddings, pre-LN blocks, final LN, output tied to the input.

    The Llama-family options (RoPE, RMSNorm, SwiGLU, GQA, no biases, an untied ``output_layer``)
    come from the config; the layer order and per-layer seeds stay those of the pipeline form.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group=None,
        seed: int = 1234,
        on_layer: Callable[[nn.Module], None] | None = None,
    ):
        """``on_layer(layer)`` runs on each layer as soon as it is built and drawn, before the
        next one is (ZeRO-3 partitions it over data parallelism there: the rank never holds
        more than its partition of the built layers plus the one being built)."""
        super().__init__()
        self.cfg = cfg
        self.tp_group = tp_group

        def done(layer: nn.Module) -> nn.Module:
            if on_layer is not None:
                on_layer(layer)
            return layer

        # Layer index i is seeded with seed + i, exactly as PipelineModule(seed_layers=True).
        seed_everything(seed + 0)
        self.embedding = done(GPTEmbedding(cfg, tp_group))
        blocks = []
        for i in range(cfg.num_layers):
            seed_everything(seed + 1 + i)
            blocks.append(done(TransformerBlock(cfg, tp_group)))
        self.layers = nn.ModuleList(blocks)
        seed_everything(seed + 1 + cfg.num_layers)
        self.final_norm = done(FinalLayerNorm(cfg, tp_group))
        self.output_layer = None
        if not cfg.tied:  # pipeline index L + 2
            seed_everything(seed + 2 + cfg.num_layers)
            self.output_layer = done(OutputLayer(cfg, tp_group))
        self.loss_fn = GPTLoss(tp_group, cfg.vocab_size)
        self.checkpoint_fn: Callable | None = None
        """Set to an activation-checkpoint function (e.g. deepspeed.checkpointing.checkpoint)."""

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        # (b, s) -> (b, s, h) after the final LayerNorm
        x = self.embedding(input_ids)
        for block in self.layers:
            if self.checkpoint_fn is not None and self.training:
                x = self.checkpoint_fn(block, x)
            else:
                x = block(x)
        return self.final_norm(x)

    def head_logits(self, hidden: torch.Tensor, mask_padding: bool = True) -> torch.Tensor:
        """(b, s, h) -> logits shard (b, s, V/tp) from the tied embedding or the output layer."""
        head = self.embedding if self.output_layer is None else self.output_layer
        return head.lm_logits(hidden, mask_padding=mask_padding)

    def forward(self, input_ids: torch.Tensor, labels=None) -> torch.Tensor:
        """Logits shard (b, s, V/tp) without labels, else the mean loss (a scalar)."""
        hidden = self.hidden_states(input_ids)  # (b, s, h)
        if labels is None:
            return self.head_logits(hidden)
        # Training/eval loss: the loss excludes the padding columns itself and works in place
        # in the logits buffer, so no (b, s, V/tp) copy of the logits is made.
        logits = self.head_logits(hidden, mask_padding=False)
        return self.loss_fn(logits, labels, inplace=True)

    @torch.no_grad()
    def full_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """All-gathered logits (b, s, V) without the vocabulary padding: for inference/tests."""
        logits = gather_from_tp_region(self.forward(input_ids), self.tp_group)
        return logits[..., : self.cfg.vocab_size]
