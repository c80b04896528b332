"""Topology rank math without processes, checked against DeepSpeed's own topology object."""

import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from mtnlg.distributed import ParallelConfigError, ParallelDims

LAYOUTS = [
    (1, 1, 1),
    (2, 1, 2),
    (2, 2, 1),
    (8, 2, 2),
    (8, 2, 4),
    (16, 4, 2),
    (12, 1, 3),
    (280, 8, 35),
]


@pytest.mark.parametrize("world,tp,pp", LAYOUTS)
def test_rank_math_matches_deepspeed(world, tp, pp):
    dims = ParallelDims(world_size=world, tp=tp, pp=pp)
    assert dims.dp * tp * pp == world
    ds = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dims.dp)
    for rank in range(world):
        c = ds.get_coord(rank)
        assert dims.coords(rank) == (c.pipe, c.data, c.model)
        assert dims.rank(pp=c.pipe, dp=c.data, tp=c.model) == rank
    groups = {
        "model": {tuple(dims.tp_ranks(r)) for r in range(world)},
        "pipe": {tuple(dims.pp_ranks(r)) for r in range(world)},
        "data": {tuple(dims.dp_ranks(r)) for r in range(world)},
    }
    for axis, ours in groups.items():
        theirs = {tuple(g) for g in ds.get_axis_comm_lists(axis)} or {(r,) for r in range(world)}
        assert ours == theirs, axis


def test_tp_groups_are_contiguous_ranks():
    # TP innermost: a TP group of 8 is one 8-GPU node, as MT-NLG placed it.
    dims = ParallelDims(world_size=280 * 8 // 8, tp=8, pp=35)
    for r in range(0, dims.world_size, 8):
        assert dims.tp_ranks(r) == list(range(r, r + 8))


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(world_size=6, tp=4, pp=1), "--tensor-model-parallel-size"),
        (dict(world_size=4, tp=1, pp=3), "--pipeline-model-parallel-size"),
        (dict(world_size=4, tp=0, pp=1), "--tensor-model-parallel-size"),
        (dict(world_size=4, tp=1, pp=0), "--pipeline-model-parallel-size"),
    ],
)
def test_invalid_world(kwargs, flag):
    with pytest.raises(ParallelConfigError, match=flag):
        ParallelDims(**kwargs)


@pytest.mark.parametrize(
    "model,flag",
    [
        (dict(num_layers=4, hidden_size=64, num_attention_heads=6), "--num-attention-heads"),
        (dict(num_layers=4, hidden_size=66, num_attention_heads=4), "--hidden-size"),
        (dict(num_layers=1, hidden_size=64, num_attention_heads=4), "--num-layers"),
        (dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=1001), "vocab"),
    ],
)
def test_invalid_model_for_layout(model, flag):
    dims = ParallelDims(world_size=4, tp=2, pp=2)
    with pytest.raises(ParallelConfigError, match=flag):
        dims.validate_model(**model)


def test_valid_model_passes():
    ParallelDims(world_size=280 * 8, tp=8, pp=35).validate_model(
        num_layers=105, hidden_size=20480, num_attention_heads=128, vocab_size=51200
    )
