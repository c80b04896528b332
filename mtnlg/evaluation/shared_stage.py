"""The inference engine's ``StageModel`` built on the modules of a loaded DeepSpeed engine.

The two hold the same classes (``GPTEmbedding``, ``TransformerBlock``, ``FinalLayerNorm``, the
untied ``OutputLayer``) for the same pipeline indices (DeepSpeed's ``type:TransformerBlock`` cut is what ``stage_bounds``
computes), so the stage is assembled from the engine's own modules: no second copy of the
weights, no second read of the checkpoint. The stage's shell is built on the meta device.
"""

from __future__ import annotations

import torch

from mtnlg.distributed.topology import Topology
from mtnlg.inference.stage import StageModel


def stage_from_engine(engine, topo: Topology) -> StageModel:
    """This rank's ``StageModel`` sharing ``engine``'s parameters (a ``GPTModel`` at PP=1, a
    ``GPTPipe`` at PP > 1: its layers are submodules named by pipeline index)."""
    module = engine.module
    cfg = module.cfg
    with torch.device("meta"):
        stage = StageModel(cfg, topo.tp_group, topo.pp_rank, topo.pp)
    if topo.pp > 1:
        if stage.embedding is not None:  # tied: one module shared by the first and last stage
            stage.embedding = (
                module.tied_modules["embed"] if cfg.tied else module.get_submodule("0")
            )
        for i in stage.layer_ids:
            stage.layers[str(i)] = module.get_submodule(str(i + 1))
        if stage.final_norm is not None:
            stage.final_norm = module.get_submodule(str(cfg.num_layers + 1))
        if stage.output_layer is not None:
            stage.output_layer = module.get_submodule(str(cfg.num_layers + 2))
    else:
        stage.embedding = module.embedding
        for i in stage.layer_ids:
            stage.layers[str(i)] = module.layers[i]
        stage.final_norm = module.final_norm
        stage.output_layer = module.output_layer
    left = [n for n, t in [*stage.named_parameters(), *stage.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"stage_from_engine: tensors not taken from the engine: {left[:4]}")
    return stage.eval()
