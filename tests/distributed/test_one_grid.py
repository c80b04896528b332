"""One process grid: ``GPTPipe`` and the pipeline engine reuse ``Topology``'s groups.

At world size 8 (TP2 x PP2 x DP2) the ``new_group`` calls of our whole set-up (``Topology``,
``GPTPipe``, ``deepspeed.initialize``) are counted and compared with DeepSpeed's own minimum:
the calls DeepSpeed itself makes for the same ``PipelineModule`` layers on its topology object
and its engine (19 here: world group, 14 grid groups, 4 tied-embedding groups). Before the grid
was shared, ``Topology`` added its own 14.
Each ``new_group`` is a collective over the whole world (hundreds at 2,240 ranks) and an NCCL
communicator per member group.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.gpt_helpers import tiny_config
from tests.helpers.dist import run_distributed

DS_CONFIG = {
    "train_batch_size": 4,
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 1},
}


def _count_new_group(build) -> tuple[int, object]:
    import torch.distributed as dist

    real, calls = dist.new_group, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.new_group = counting
    try:
        out = build()
    finally:
        dist.new_group = real
    return len(calls), out


def _ours():
    import deepspeed

    from mtnlg.distributed.topology import ParallelDims, Topology
    from mtnlg.model.pipe import GPTPipe

    topo = Topology(ParallelDims(world_size=8, tp=2, pp=2))
    model = GPTPipe(tiny_config(num_layers=2), topo, seed=1)
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG)
    return engine.grid is topo.grid and model._grid is topo.grid


def _deepspeed_only():
    """DeepSpeed's own calls: its PipelineModule (world group, grid, tied-weight groups) and
    engine. The layers' TP groups are made before counting starts (DeepSpeed's grid only exists
    inside PipelineModule, after the layers would need one)."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    from mtnlg.distributed.topology import ParallelDims
    from mtnlg.model.gpt import GPTLoss
    from mtnlg.model.pipe import gpt_layer_specs

    ds_topo = ParallelDims(world_size=8, tp=2, pp=2).ds_topology()
    cfg = tiny_config(num_layers=2)
    tp_ranks = ds_topo.get_axis_comm_lists("model")
    groups = [torch.distributed.new_group(r) for r in tp_ranks]
    me = torch.distributed.get_rank()
    tp_group = next(g for g, r in zip(groups, tp_ranks, strict=True) if me in r)

    def build():
        model = PipelineModule(
            layers=gpt_layer_specs(cfg, tp_group), loss_fn=GPTLoss(tp_group, cfg.vocab_size),
            topology=ds_topo, partition_method="type:TransformerBlock",
        )  # fmt: skip
        deepspeed.initialize(model=model, config=DS_CONFIG)

    return _count_new_group(build)[0]


def _body(rank, world_size):
    ours, shared = _count_new_group(_ours)
    return ours, _deepspeed_only(), shared


@pytest.mark.timeout(300)
def test_pipeline_engine_reuses_topology_grid():
    results = run_distributed(_body, 8, timeout=240, start_method="forkserver")
    for ours, minimum, shared in results:
        assert shared  # the engine's grid is Topology's
        assert ours == minimum, (ours, minimum)
