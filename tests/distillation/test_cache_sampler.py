"""The teacher pass's tail sampler (``cache_write.vocab_parallel_sample``) at TP = 1 and 2.

2,000 rows of one 2-token sample, K2 = 8 draws each (16,000 per token), vocabulary 20 padded
to 24 (TP2: rank 1 owns ids 12..23, 20..23 padding, holding large junk logits):

* the draws follow the teacher's tail distribution softmax(z / T) restricted to the ids outside
  its top-3 (a chi-square test per token at the 1e-4 level, T = 1 at TP1, T = 2 at TP2; the
  same test rejects the tail at 2T); head and padding ids are never drawn; the values are the
  teacher's logits at the drawn ids;
* both TP ranks return the same draws; the same rows drawn again, or split in two calls (as a
  resumed or re-batched writer would), give identical draws; another seed gives others;
* with every real id in the head (no tail) each draw is id 0 with value -inf.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtnlg.distillation.cache_write import vocab_parallel_sample
from tests.helpers.dist import run_distributed

N, S, V, PADDED, K1, K2, SEED = 2000, 2, 20, 24, 3, 8, 11


def _teacher() -> torch.Tensor:  # (1, S, PADDED): real logits, junk in the padding
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, S, PADDED, generator=g) * 1.5
    z[..., V:] = 50.0  # would dominate if the padding were not excluded
    return z


def _head() -> torch.Tensor:  # (1, S, K1) the top-3 real ids
    return _teacher()[..., :V].topk(K1, dim=-1).indices.sort(-1).values


def _draws(rank: int, tp: int, group, temperature: float) -> dict:
    n = PADDED // tp
    z = _teacher()[..., rank * n : (rank + 1) * n].expand(N, S, n)
    head = _head().expand(N, S, K1)

    def draw(rows, seed=SEED, ids=head):
        return vocab_parallel_sample(
            z[rows], ids[rows], K2, temperature, range(rows.start, rows.stop), seed, group, V
        )

    everything = torch.arange(V).expand(N, S, V)
    return {
        "all": draw(slice(0, N)),
        "again": draw(slice(0, N)),
        "split": [draw(slice(0, 700)), draw(slice(700, N))],
        "seed": draw(slice(0, N), seed=SEED + 1),
        "no tail": draw(slice(0, 4), ids=everything),
    }


def _on_ranks(rank, world_size, temperature):
    import torch.distributed as dist

    return _draws(rank, world_size, dist.new_group(list(range(world_size))), temperature)


def _chi2_bound(df: int, z: float = 3.719) -> float:
    """The chi-square quantile at 1 - 1e-4 (z its normal quantile), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _check(out: dict, temperature: float) -> None:
    values, ids = out["all"]
    assert ids.shape == (N, S, K2) and values.dtype == torch.float32
    assert (ids.diff(dim=-1) >= 0).all(), "sorted by id"
    teacher, head = _teacher()[0], _head()[0]
    torch.testing.assert_close(values, teacher.expand(N, S, PADDED).gather(-1, ids))
    assert (ids < V).all(), "a padding id was drawn"
    tail = torch.ones(S, V, dtype=torch.bool).scatter(-1, head, False)
    for t in range(S):
        counts = torch.bincount(ids[:, t].reshape(-1), minlength=V).double()
        assert counts[~tail[t]].sum() == 0, "a head id was drawn"
        bound = _chi2_bound(int(tail[t].sum()) - 1)
        for temp in (temperature, 2 * temperature):  # the right one, and a wrong one
            p = torch.softmax(teacher[t, :V].double() / temp, -1)[tail[t]]
            expected = p / p.sum() * N * K2
            assert expected.min() > 20  # the chi-square approximation holds
            chi2 = ((counts[tail[t]] - expected) ** 2 / expected).sum().item()
            assert (chi2 < bound) == (temp == temperature), (t, temp, chi2, bound)
    assert all(torch.equal(a, b) for a, b in zip(out["again"], out["all"]))
    split = [torch.cat(parts) for parts in zip(*out["split"])]
    assert all(torch.equal(a, b) for a, b in zip(split, out["all"])), "depends on the batching"
    assert not torch.equal(out["seed"][1], ids), "the seed must change the draws"
    values, ids = out["no tail"]
    assert (ids == 0).all() and torch.isneginf(values).all()


def test_tp1_sampler_draws_the_tail_distribution():
    _check(_draws(0, 1, None, 1.0), 1.0)


@pytest.mark.timeout(240)
def test_tp2_sampler_draws_the_tail_distribution_on_every_rank():
    outs = run_distributed(_on_ranks, 2, args=(2.0,), timeout=200, start_method="forkserver")
    for key in ("all", "seed", "no tail"):
        assert all(torch.equal(a, b) for a, b in zip(outs[0][key], outs[1][key])), key
    _check(outs[0], 2.0)
