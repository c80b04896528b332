"""Sequence-parallel collectives on gloo: the reduce-scatter path itself (no all-reduce fallback
since gloo has ``reduce_scatter``), against references computed in the test from every rank's
seeded inputs, and against the all-reduce-then-slice it replaced.

World 4 with TP=4 (one group) and TP=2 (groups {0,1}, {2,3}: the group rank, not the global
rank, picks the slice). fp32 and bf16; forward (reduce-scatter) and backward (all-gather) of
``reduce_scatter_to_sequence``, and the backward of ``sequence_parallel_linear`` (whose input
gradient is reduce-scattered).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_distributed

B, S, H = 2, 8, 6


def _x(rank: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(B, S, H, generator=g).to(dtype)


def _checks(rank: int, world_size: int):
    import torch.distributed as dist

    from mtnlg.tensor_parallel.sequence import reduce_scatter_to_sequence, sequence_parallel_linear

    calls = []
    real_rs, real_ar = dist.reduce_scatter, dist.all_reduce
    dist.reduce_scatter = lambda *a, **k: (calls.append("reduce_scatter"), real_rs(*a, **k))[1]
    dist.all_reduce = lambda *a, **k: (calls.append("all_reduce"), real_ar(*a, **k))[1]
    out = {}
    for tp in (4, 2):
        groups = [dist.new_group(list(range(i, i + tp))) for i in range(0, world_size, tp)]
        group, r, first = groups[rank // tp], rank % tp, rank // tp * tp
        for dtype in (torch.float32, torch.bfloat16):
            tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
            x = _x(rank, dtype).requires_grad_()
            calls.clear()
            y = reduce_scatter_to_sequence(x, group)  # (b, s/tp, h)
            assert calls == ["reduce_scatter"], calls  # the real reduce-scatter, nothing else
            # reference: the group's inputs summed (in fp32), this group rank's contiguous slice
            total = sum(_x(first + k, dtype).float() for k in range(tp))
            ref = total.chunk(tp, dim=1)[r]
            torch.testing.assert_close(y.float(), ref, **tol)
            # the path it replaced: all-reduce, then one's slice
            ar = x.detach().clone()
            real_ar(ar, group=group)
            torch.testing.assert_close(y.detach(), ar.chunk(tp, dim=1)[r].contiguous(), **tol)
            # backward: all-gather of every rank's output gradient
            grad = _x(50 + rank, dtype)[:, : S // tp]
            y.backward(grad)
            gref = torch.cat([_x(50 + first + k, dtype)[:, : S // tp] for k in range(tp)], dim=1)
            torch.testing.assert_close(x.grad, gref)
            # sequence_parallel_linear: input gradient reduce-scattered over the sequence
            w = torch.randn(H, H, generator=torch.Generator().manual_seed(7)).to(dtype)
            xs = _x(rank, dtype)[:, : S // tp].clone().requires_grad_()
            calls.clear()
            sequence_parallel_linear(xs, w, None, group).sum().backward()
            assert "reduce_scatter" in calls and "all_reduce" not in calls, calls
            # d/dx of sum over every rank's full output: each rank's output grad is ones, so the
            # summed gradient of this slice is tp * ones @ w
            expect = torch.full((B, S // tp, H), float(tp), dtype=torch.float32) @ w.float()
            torch.testing.assert_close(xs.grad.float(), expect, **tol)
            out[(tp, str(dtype))] = True
    return out


@pytest.mark.timeout(240)
def test_reduce_scatter_path_on_gloo():
    results = run_distributed(_checks, world_size=4, timeout=200)
    assert all(len(r) == 4 and all(r.values()) for r in results), results
