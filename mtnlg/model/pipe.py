"""GPT as a DeepSpeed ``PipelineModule``: a flat list of layer specs.

Index 0 is the embedding, 1..L the transformer blocks, L+1 the final LayerNorm and L+2 the
output layer. The embedding is a ``TiedLayerSpec("embed")`` used twice: on the first stage as the
input embedding and on the last as the output projection, DeepSpeed keeping the two copies of
``word_embeddings.weight`` equal (it broadcasts at start and all-reduces their gradients). A
stage builds a tied key from the first of its specs that names it, so the last stage (PP > 1)
builds the head-only spec: the word embeddings without the position table it never reads; one
stage (PP = 1) builds the full embedding once and uses it both ways. Stages are cut by counting
``TransformerBlock`` specs. Between stages only the hidden state (b, s, h) travels.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from mtnlg.config import ModelConfig
from mtnlg.distributed.topology import Topology
from mtnlg.model.gpt import GPTLoss, seed_everything
from mtnlg.model.layers import FinalLayerNorm, GPTEmbedding, OutputLayer, TransformerBlock


def _lm_head(embedding: GPTEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    # (b, s, h) -> (b, s, V/tp) through the tied word embedding. The padding columns are left
    # unmasked (no (b, s, V/tp) copy): the pipeline's loss (GPTLoss with the real vocabulary
    # size) excludes them from the softmax.
    return embedding.lm_logits(hidden, mask_padding=False)


def gpt_layer_specs(cfg: ModelConfig, tp_group=None) -> list:
    """The pipeline layer list; the plain ``GPTModel`` builds the same modules in this order."""
    if not cfg.tied:  # the embedding on the first stage, a separate output layer on the last
        specs = [LayerSpec(GPTEmbedding, cfg, tp_group)]
        specs += [LayerSpec(TransformerBlock, cfg, tp_group) for _ in range(cfg.num_layers)]
        specs.append(LayerSpec(FinalLayerNorm, cfg, tp_group))
        # padding columns unmasked, as _lm_head: GPTLoss excludes them
        specs.append(LayerSpec(OutputLayer, cfg, tp_group, mask_padding=False))
        return specs
    specs: list = [
        TiedLayerSpec(
            "embed", GPTEmbedding, cfg, tp_group, tied_weight_attr="word_embeddings.weight"
        )
    ]
    specs += [LayerSpec(TransformerBlock, cfg, tp_group) for _ in range(cfg.num_layers)]
    specs.append(LayerSpec(FinalLayerNorm, cfg, tp_group))
    specs.append(
        TiedLayerSpec(
            "embed",
            GPTEmbedding,
            cfg,
            tp_group,
            head_only=True,  # built only where index 0 is not (the last stage, PP > 1)
            forward_fn=_lm_head,
            tied_weight_attr="word_embeddings.weight",
        )
    )
    return specs


@contextmanager
def _reuse_grid(topo: Topology):
    """Make ``PipelineModule.__init__`` take ``topo.grid`` instead of building its own.

    DeepSpeed 0.19's PipelineModule always constructs a ``PipelineParallelGrid`` (every data,
    pipe and slice group: a world collective each, and duplicate NCCL communicators) and has no
    argument to pass one in; ``Topology`` built exactly that grid already, so it is handed over.
    """
    import deepspeed.runtime.pipe.module as ds_module

    real = ds_module.PipelineParallelGrid

    def reuse(process_group=None, topology=None):
        if topology is not topo.ds_topo:
            raise RuntimeError("PipelineModule asked for a grid of another topology")
        return topo.grid

    ds_module.PipelineParallelGrid = reuse
    try:
        yield
    finally:
        ds_module.PipelineParallelGrid = real


class GPTPipe(PipelineModule):
    """The pipeline form of ``GPTModel`` for ``deepspeed.initialize`` (``engine.train_batch``)."""

    def __init__(
        self,
        cfg: ModelConfig,
        topo: Topology,
        seed: int = 1234,
        activation_checkpoint_interval: int = 0,
        partition_method: str = "type:TransformerBlock",
        head: LayerSpec | None = None,
        loss_fn: torch.nn.Module | None = None,
    ):
        """``head`` / ``loss_fn`` replace the tied LM head (the last spec) and ``GPTLoss``
        (e.g. a classification head; the embedding then appears once, on the first stage)."""
        specs = gpt_layer_specs(cfg, topo.tp_group)
        if head is not None:
            specs[-1] = head
        with _reuse_grid(topo):
            super().__init__(
                layers=specs,
                loss_fn=loss_fn if loss_fn is not None else GPTLoss(topo.tp_group, cfg.vocab_size),
                topology=topo.ds_topo,
                seed_layers=True,
                seed_fn=seed_everything,
                base_seed=seed,
                partition_method=partition_method,
                activation_checkpoint_interval=activation_checkpoint_interval,
                checkpointable_layers=["TransformerBlock"],
            )
        self.cfg = cfg
        # seed_layers=True seeded each layer's construction (TP/PP-invariant init). DeepSpeed
        # would also reseed the default generator before every layer of every forward from a
        # micro-batch counter that a resumed run restarts at 0; turned off, dropout draws from
        # the default and TP-tracker streams, which checkpoints save and restore.
        self.seed_layers = False
