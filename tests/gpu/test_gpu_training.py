"""The ``gpu`` suite: what only a CUDA machine can show (skipped without one; never in the
default run, which deselects ``gpu``). Run it with ``pytest -m gpu tests/gpu``.

* NCCL TP2 (2 GPUs) equals TP1 (1 GPU): losses, gradient norms and final weights, fp32.
* fp16 dynamic loss scaling: a loss scale far too large (2^32: the logits' gradient alone,
  ~4e-3 per token, overflows fp16's 65504) overflows; each overflowing step is skipped and
  halves the scale, then training proceeds and the loss falls.
* bf16 with ZeRO-1 (fp32 masters, fp32 gradient accumulation) tracks the fp32 run within the
  CPU suite's bf16 tolerances.

The model is the CPU equivalence tests' (4 layers, h 64, the demo corpus on the 5,000-token
BPE, global batch 8), so a GPU run is seconds plus start-up.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import demo_prefix  # noqa: F401 - the session fixture, reused
from tests.e2e.pretrain_runs import (
    DECAY_ITERS,
    assert_equivalent,
    equivalence_args,
    max_rel,
)
from tests.gpu.gpu_runs import cuda_count, launch_gpu, metric_rows, needs_gpus

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cuda_count() == 0, reason="needs a CUDA GPU (torch.cuda unavailable)"),
]

# fp32 on GPUs: cuBLAS and NCCL reorder sums differently from the CPU, TF32 stays off (PyTorch's
# default for matmuls); allowed 10x the CPU suite's 1e-6 / 1e-5.
LOSS_RTOL = NORM_RTOL = 1e-5
WEIGHT_ATOL = 1e-4
BF16_LOSS_RTOL, BF16_NORM_RTOL = 1e-3, 1e-2  # tests/e2e/test_equivalence.py::test_bf16_tracks_fp32


@pytest.fixture(scope="module")
def fp32_reference(demo_prefix, tmp_path_factory):  # noqa: F811
    """One GPU, TP1, micro-batch 8, fp32, ``DECAY_ITERS`` iterations."""
    out = tmp_path_factory.mktemp("gpu_ref")
    run = launch_gpu(equivalence_args(demo_prefix, mb=8, iters=DECAY_ITERS), 1, out)
    assert run.losses[-1] < run.losses[0] - 0.5  # it learns
    return run


@needs_gpus(2)
@pytest.mark.timeout(900)
def test_nccl_tp2_equals_tp1(demo_prefix, fp32_reference, tmp_path):  # noqa: F811
    argv = equivalence_args(demo_prefix, tp=2, mb=2, iters=DECAY_ITERS)
    got = launch_gpu(argv, 2, tmp_path)
    assert got.layout == (2, 1, 1)
    assert_equivalent(got, fp32_reference, LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL)


@pytest.mark.timeout(900)
def test_bf16_zero1_tracks_fp32(demo_prefix, fp32_reference, tmp_path):  # noqa: F811
    argv = equivalence_args(demo_prefix, iters=DECAY_ITERS, extra=["--bf16", "--zero-stage", "1"])
    got = launch_gpu(argv, 1, tmp_path, save=False)
    assert len(got.losses) == DECAY_ITERS
    assert max_rel(got.losses, fp32_reference.losses) <= BF16_LOSS_RTOL
    assert max_rel(got.grad_norms, fp32_reference.grad_norms) <= BF16_NORM_RTOL
    assert got.losses != fp32_reference.losses  # bf16 really ran


@pytest.mark.timeout(900)
def test_fp16_dynamic_loss_scale_skips_overflows_and_converges(demo_prefix, tmp_path):  # noqa: F811
    iters = 50
    cfg = {
        "fp16": {
            "enabled": True, "loss_scale": 0, "initial_scale_power": 32, "hysteresis": 1,
            "loss_scale_window": 1000, "min_loss_scale": 1,
        },
    }  # fmt: skip
    argv = equivalence_args(demo_prefix, iters=iters, extra=["--fp16", "--lr-decay-iters", "60"])
    launch_gpu(argv, 1, tmp_path / "run", save=False, ds=cfg)
    rows = metric_rows(tmp_path / "run" / "metrics.jsonl")
    scales = [r["loss_scale"] for r in rows]
    skipped = [r["skipped_iters"] for r in rows]
    assert scales[0] == 2**31 and skipped[0] == 1  # the first step overflowed: skipped, halved
    assert skipped[-1] >= 5  # 2^32 -> below 2^27 at least
    drops = [i for i in range(1, iters) if scales[i] < scales[i - 1]]
    assert all(skipped[i] == skipped[i - 1] + 1 for i in drops)  # a drop = one skipped step
    assert skipped[-1] < iters // 2  # most steps were taken
    assert all(s >= 1 for s in scales) and scales == sorted(scales, reverse=True)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # it still learns
