"""Layouts, activation checkpointing and bf16 against references that can tell them apart.

Every layout run is compared with a TP=1 x PP=1 x DP=1 run of the same seed and data with one
micro-batch of 8 (no accumulation, no parallelism: the independent reference) on three things:
the loss and the gradient norm of every iteration, and the final weights merged from the
checkpoint by the converter's reader. With clipping off, a constant gradient factor (DP sum
instead of mean, accumulation not divided) doubles the gradient norm; with Adam's eps at 1e-4
it moves the losses (~3e-3) and weights (~2e-3) too (see ``equivalence_args``).

Tolerances (fp32 on the CPU, dropout 0): the layouts only reorder fp32 sums (TP partial sums,
DP all-reduces, micro-batch accumulation). Measured: losses and gradient norms within 1.4e-7
relative (one fp32 ulp at ~8.5 is 1.1e-7), weights within 1.2e-7. We allow 1e-6 relative
(~9 ulps) and 1e-5 absolute on weights of magnitude <= 1.
"""

from __future__ import annotations

import pytest

from tests.e2e.pretrain_runs import (
    DECAY_ITERS,
    ITERS,
    Run,
    assert_equivalent,
    equivalence_args,
    launch,
    max_rel,
    merged_weights,
    pretrain,
)

LOSS_RTOL = NORM_RTOL = 1e-6
WEIGHT_ATOL = 1e-5
FP32 = {"torch.float32/torch.float32/torch.float32"}  # params / block input / block output


@pytest.fixture(scope="module")
def reference(demo_prefix, tmp_path_factory) -> dict[str, Run]:
    """TP1 x PP1 x DP1, micro-batch 8, fp32: ``DECAY_ITERS`` iterations ("bf16") and its first
    ``ITERS`` with the weights saved there ("layouts")."""
    out = tmp_path_factory.mktemp("reference")
    argv = equivalence_args(demo_prefix, mb=8, iters=DECAY_ITERS)
    full = pretrain(argv + ["--save-interval", str(ITERS)], 1, out)
    assert full.dtypes == FP32 and full.layout == (1, 1, 1)
    assert full.losses[-1] < full.losses[0] - 0.5  # it learns
    weights, _ = merged_weights(out / "ckpt", f"iter_{ITERS:07d}")
    first = Run(full.losses[:ITERS], full.grad_norms[:ITERS], weights, (1, 1, 1))
    return {"layouts": first, "bf16": full}


@pytest.mark.timeout(900)
# slow: 8 fresh interpreters (~45 s more than forked ranks); the default run keeps the same
# layout in test_tp2_pp2_dp2 and the launcher in test_pretrain, test_harness, tests/faults
@pytest.mark.slow
def test_tp2_pp2_dp2_through_deepspeed_launcher(demo_prefix, reference, tmp_path):
    """8 processes started by `deepspeed --hostfile` (ZeRO-1, pipeline engine, accumulation 2)."""
    got = launch(equivalence_args(demo_prefix, tp=2, pp=2), 8, tmp_path)
    assert got.layout == (2, 2, 2)
    assert_equivalent(got, reference["layouts"], LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL)


@pytest.mark.timeout(900)
def test_tp2_pp2_dp2(demo_prefix, reference, tmp_path):
    """The same 8 ranks spawned by ``run_distributed`` (ZeRO-1, pipeline engine, accumulation 2)."""
    got = pretrain(equivalence_args(demo_prefix, tp=2, pp=2), 8, tmp_path)
    assert got.layout == (2, 2, 2)
    assert got.block_calls == [ITERS * 2 * 2] * 8  # iterations x micro-batches x blocks/stage
    assert_equivalent(got, reference["layouts"], LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL)


@pytest.mark.timeout(900)
def test_pp2_dp2_with_accumulation(demo_prefix, reference, tmp_path):
    """Pipeline engine, 2 micro-batches per rank and step: the accumulation is divided."""
    got = pretrain(equivalence_args(demo_prefix, pp=2), 4, tmp_path)
    assert got.layout == (1, 2, 2)
    assert got.block_calls == [ITERS * 2 * 2] * 4  # iterations x micro-batches x blocks/stage
    assert_equivalent(got, reference["layouts"], LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL)


@pytest.mark.timeout(900)
# ZeRO-2 shares ZeRO-1's optimizer class (DeepSpeedZeroOptimizer): slow only, for test time
@pytest.mark.parametrize("zero", [1, pytest.param(2, marks=pytest.mark.slow), 3])
def test_tp2_dp2_zero(demo_prefix, reference, tmp_path, zero):
    """Plain engine with TP and every ZeRO stage (ZeRO-3's checkpoint is not one the converter
    reads: losses and gradient norms only)."""
    argv = equivalence_args(demo_prefix, tp=2, extra=["--zero-stage", str(zero)])
    got = pretrain(argv, 4, tmp_path, save=zero < 3)
    assert got.layout == ((2, 1, 2) if zero < 3 else None)
    assert_equivalent(
        got, reference["layouts"], LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL if zero < 3 else None
    )


@pytest.mark.timeout(900)
# TP2xPP2 replays dropout through both the TP RNG tracker and the pipeline: TP2 alone is slow
@pytest.mark.parametrize("tp,pp", [pytest.param(2, 1, marks=pytest.mark.slow), (2, 2)])
def test_activation_checkpointing_replays_dropout(demo_prefix, reference, tmp_path, tp, pp):
    """Dropout 0.1: recomputing the blocks in backward replays their dropout masks (default and
    TP-tracker RNG streams), so the run is the one without activation checkpointing.

    Measured bit-exact (losses, gradient norms, weights); a recompute that drew new masks
    differs by ~1e-2. The forward-call count proves the blocks really were recomputed.
    """
    argv = equivalence_args(demo_prefix, tp=tp, pp=pp, dropout=0.1)
    plain = pretrain(argv, tp * pp, tmp_path / "plain")
    ckpt = pretrain(argv + ["--checkpoint-activations"], tp * pp, tmp_path / "ckpt")
    # dropout is on: the first loss (same weights, same data) is not the reference's
    assert abs(plain.losses[0] - reference["layouts"].losses[0]) > 1e-4
    calls = ITERS * 4 * (4 // pp)  # iterations x micro-batches x blocks on this stage
    assert plain.block_calls == [calls] * (tp * pp)
    assert ckpt.block_calls == [2 * calls] * (tp * pp)  # forward + recompute
    assert_equivalent(ckpt, plain, LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL)


BF16_LOSS_RTOL = 1e-3
BF16_NORM_RTOL = 1e-2


@pytest.mark.timeout(900)
def test_bf16_tracks_fp32(demo_prefix, reference, tmp_path):
    """bf16 (accumulation 4) follows the fp32 reference for 20 iterations.

    bf16 keeps 8 significant bits: each rounding is off by up to 2^-9 = 2e-3 relative. Weights
    are mastered in fp32 and the loss is a mean over 256 tokens of many independent roundings,
    so the loss stays far closer: measured <= 1.1e-4 relative with fp32 or bf16 gradient
    accumulation; 1e-3 (half a bf16 step) leaves 9x margin and is below one iteration's progress
    (~1e-2). The gradient norm is a norm of bf16 gradients: measured <= 2.0e-3, allowed 1e-2.
    Updating bf16 weights without fp32 masters (ZeRO-0) drifts 5.6e-3 in loss and 7e-2 in norm;
    a gradient factor 2 gives 1.2e-2 and 1.0: both fail.
    """
    argv = equivalence_args(demo_prefix, iters=DECAY_ITERS, extra=["--bf16"])
    got = pretrain(argv, 1, tmp_path, save=False)
    want = reference["bf16"]
    assert got.dtypes == {"torch.bfloat16/torch.bfloat16/torch.bfloat16"}  # bf16 really ran
    assert got.block_calls == [DECAY_ITERS * 4 * 4]
    assert len(got.losses) == len(want.losses) == DECAY_ITERS
    assert max_rel(got.losses, want.losses) <= BF16_LOSS_RTOL, (got.losses, want.losses)
    assert max_rel(got.grad_norms, want.grad_norms) <= BF16_NORM_RTOL, (
        got.grad_norms,
        want.grad_norms,
    )
    assert got.losses != want.losses  # not fp32 in disguise


@pytest.mark.timeout(900)
def test_tp2_pp2_sequence_parallel(demo_prefix, reference, tmp_path):
    """--sequence-parallel: LayerNorm/dropout regions on (b, s/tp, h) slices, all-gather and
    reduce-scatter instead of the all-reduces, LayerNorm and row-bias gradients summed over TP:
    the same losses, gradient norms and weights as TP1 (hence as TP without it)."""
    extra = ["--sequence-parallel", "--checkpoint-activations"]  # recompute on the slices too
    got = pretrain(equivalence_args(demo_prefix, tp=2, pp=2, extra=extra), 4, tmp_path)
    assert got.layout == (2, 2, 1)
    assert_equivalent(got, reference["layouts"], LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL)
