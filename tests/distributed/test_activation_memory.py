"""Activation memory of one transformer block at TP2, with and without sequence parallelism,
measured against the planner's formula (Korthikanti et al. 2022, eqs. 2 and 4).

Each rank counts the bytes of the tensors autograd saves for backward
(``saved_tensors_hooks``; one count per storage, parameters excluded, the block's input
included: it is the first norm's input). The block runs in fp32 with dropout on, so every
stored value is 4 B, and on the CPU each dropout keeps its scaled noise in fp32 (4 B per mask
element; CUDA keeps 1 B bool masks): the planner's own function at ``value_bytes=4,
mask_bytes=4`` must then give the measured bytes, plus the norms' fp32 mean and rstd, which the
planner leaves out. Two hidden sizes and two sequence lengths separate the terms in h, s and s^2.
"""

from __future__ import annotations

import pytest
import torch

from mtnlg.planning import activation_bytes_per_layer
from tests.helpers.dist import run_distributed

HEADS, BATCH = 4, 2
SHAPES = [(64, 32), (128, 32), (64, 64)]  # (h, s)


def _saved_bytes(block, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of ``block(x)``: distinct storages, no parameters."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x)
    y.sum().backward()  # the graph is complete and usable
    return sum(seen.values())


def _measure(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from mtnlg.config import ModelConfig
    from mtnlg.model.layers import TransformerBlock
    from mtnlg.tensor_parallel.random import model_parallel_seed

    group = dist.new_group(list(range(world_size)))
    out = {}
    for h, s in SHAPES:
        for sp in (False, True):
            torch.manual_seed(0)
            model_parallel_seed(1, tp_rank=rank)
            cfg = ModelConfig(
                num_layers=2, hidden_size=h, num_attention_heads=HEADS, seq_length=s,
                vocab_size=500, hidden_dropout=0.1, attention_dropout=0.1, sequence_parallel=sp,
            )  # fmt: skip
            block = TransformerBlock(cfg, group).train()
            x = torch.randn(BATCH, s // world_size if sp else s, h, requires_grad=True)
            out[(h, s, sp)] = _saved_bytes(block, x)
    return out


@pytest.fixture(scope="module")
def measured() -> dict:
    results = run_distributed(_measure, world_size=2, timeout=300)
    assert results[0] == results[1]  # both TP ranks hold the same amount
    return results[0]


def _planned(h: int, s: int, sp: bool, **bytes_kw) -> float:
    return activation_bytes_per_layer(s, BATCH, h, HEADS, 2, sequence_parallel=sp, **bytes_kw)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_block_activation_bytes_equal_the_planner(measured, sp):
    for h, s in SHAPES:
        norm_stats = 2 * 2 * s * BATCH // (2 if sp else 1) * 4  # two norms' fp32 mean and rstd
        expected = _planned(h, s, sp, value_bytes=4, mask_bytes=4) + norm_stats
        assert measured[(h, s, sp)] == expected, (h, s, sp)
        # the planner's number alone (no norm statistics) is within 1 %
        assert measured[(h, s, sp)] == pytest.approx(expected - norm_stats, rel=0.01)


@pytest.mark.timeout(400)
def test_sequence_parallel_splits_the_replicated_terms(measured):
    """Slopes in h at fixed s: TP2 keeps 4 + 2 = 6 values/masks x sbh replicated and 12 / 2
    per rank (x 4 B); sequence parallelism halves the replicated part (eq. 4 vs eq. 2)."""
    s, sb = 32, 32 * BATCH
    slope = {sp: (measured[(128, s, sp)] - measured[(64, s, sp)]) / 64 for sp in (False, True)}
    assert slope[False] == 4 * sb * (6 + 12 / 2)
    assert slope[True] == 4 * sb * (6 / 2 + 12 / 2)
    # the s^2 terms (softmax output, dropout mask, dropout output) are per rank either way
    quad = {
        sp: measured[(64, 64, sp)] - 2 * measured[(64, 32, sp)] for sp in (False, True)
    }  # doubling s: linear terms cancel, leaves 2 x the s^2 term at s = 32
    assert quad[False] == quad[True] == 2 * 3 * 4 * HEADS * 32 * 32 * BATCH / 2
