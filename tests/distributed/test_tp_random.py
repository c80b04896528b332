"""TP-aware dropout RNG: equal masks on replicated activations, distinct masks on split ones,
and DeepSpeed's activation checkpointing replaying the very same masks on recompute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtnlg.tensor_parallel import get_rng_tracker, model_parallel_seed
from tests.helpers.dist import run_distributed

SEED = 1234
N = 256  # elements per dropout mask


def _mask() -> np.ndarray:
    return (F.dropout(torch.ones(N), p=0.5, training=True) != 0).numpy()


def _fork_mask() -> np.ndarray:
    with get_rng_tracker().fork():
        return _mask()


def _draws(tp_rank: int, pp_rank: int = 0) -> dict[str, list[np.ndarray]]:
    """Seed, then interleave default and model-parallel draws as a model would."""
    model_parallel_seed(SEED, tp_rank=tp_rank, pp_rank=pp_rank)
    default, forked = [], []
    for _ in range(3):
        default.append(_mask())
        forked.append(_fork_mask())
    return {"default": default, "fork": forked}


def _block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A layer with dropout on a replicated activation and on a split one."""
    y = F.dropout(x @ w, p=0.5, training=True)  # default generator
    with get_rng_tracker().fork():
        y = F.dropout(torch.tanh(y), p=0.5, training=True)  # per-TP-rank generator
    return y


def _run_block(tp_rank: int, mode: str) -> dict[str, np.ndarray]:
    import deepspeed

    gen = torch.Generator().manual_seed(0)  # inputs independent of the generators under test
    x = torch.randn(4, 16, generator=gen, requires_grad=True)
    w = torch.randn(16, 32, generator=gen, requires_grad=True)
    g = torch.randn(4, 32, generator=gen)

    model_parallel_seed(SEED, tp_rank=tp_rank)
    if mode == "plain":
        out = _block(x, w)
    elif mode == "deepspeed":
        out = deepspeed.checkpointing.checkpoint(_block, x, w)
    else:  # torch's checkpoint restores the CPU generator but not DeepSpeed's tracker
        out = torch.utils.checkpoint.checkpoint(_block, x, w, use_reentrant=False)
    # Later layers draw from both streams before the backward (and the recompute) runs.
    _mask(), _fork_mask()
    out.backward(g)
    return {
        "out": out.detach().numpy(),
        "x.grad": x.grad.numpy(),
        "w.grad": w.grad.numpy(),
        # the recompute must leave both streams where the forward pass left them
        "next_default": _mask(),
        "next_fork": _fork_mask(),
    }


def _rng_body(rank: int, world_size: int):
    import deepspeed

    tp_rank = rank  # one TP group spanning the world
    first = _draws(tp_rank)
    again = _draws(tp_rank)
    other_stage = _draws(tp_rank, pp_rank=1)

    # Forking must not disturb the default stream.
    model_parallel_seed(SEED, tp_rank=tp_rank)
    default_only = [_mask() for _ in range(3)]

    deepspeed.checkpointing.configure(None, partition_activations=False)
    blocks = {mode: _run_block(tp_rank, mode) for mode in ("plain", "deepspeed", "torch")}
    return {
        "first": first,
        "again": again,
        "other_stage": other_stage,
        "default_only": default_only,
        "blocks": blocks,
    }


@pytest.fixture(scope="module")
def rng_results():
    return run_distributed(_rng_body, world_size=2, timeout=150, start_method="forkserver")


def test_default_stream_equal_across_tp(rng_results):
    r0, r1 = rng_results
    for a, b in zip(r0["first"]["default"], r1["first"]["default"]):
        np.testing.assert_array_equal(a, b)
    # ... and forking the model-parallel stream in between does not perturb it
    for a, b in zip(r0["first"]["default"], r0["default_only"]):
        np.testing.assert_array_equal(a, b)


def test_model_parallel_stream_differs_across_tp(rng_results):
    r0, r1 = rng_results
    for a, b in zip(r0["first"]["fork"], r1["first"]["fork"]):
        assert not np.array_equal(a, b), "TP ranks drew the same dropout mask on split activations"
    assert not np.array_equal(r0["first"]["fork"][0], r0["first"]["default"][0])


def test_forks_advance_deterministically(rng_results):
    for res in rng_results:
        forks = res["first"]["fork"]
        assert not np.array_equal(forks[0], forks[1]), "a fork did not advance the stream"
        assert not np.array_equal(forks[1], forks[2])
        for stream in ("default", "fork"):
            for a, b in zip(res["first"][stream], res["again"][stream]):
                np.testing.assert_array_equal(a, b)


def test_pipeline_stages_get_distinct_streams(rng_results):
    for res in rng_results:
        for stream in ("default", "fork"):
            assert not np.array_equal(res["first"][stream][0], res["other_stage"][stream][0])


def test_deepspeed_checkpoint_replays_dropout(rng_results):
    for res in rng_results:
        plain, ckpt = res["blocks"]["plain"], res["blocks"]["deepspeed"]
        for key in plain:
            np.testing.assert_allclose(ckpt[key], plain[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_checkpoint_without_tracker_would_differ(rng_results):
    """Negative control: torch's checkpoint does not restore DeepSpeed's tracker, so its
    recomputed per-TP-rank mask differs. Shows the replay test above can fail."""
    for res in rng_results:
        plain, other = res["blocks"]["plain"], res["blocks"]["torch"]
        np.testing.assert_allclose(other["out"], plain["out"], rtol=1e-6, atol=1e-6)
        assert not np.allclose(other["w.grad"], plain["w.grad"])
