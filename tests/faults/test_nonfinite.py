"""Non-finite loss or gradients (issue 16, fault 3): the update is skipped on every rank, counted,
and the run stops after ``--max-consecutive-nonfinite`` in a row.

The poison (``MTNLG_TEST_POISON_ITERS``) multiplies the model's output by NaN on one rank only
(TP rank 1, DP rank 1 or pipeline stage 1), so skipping everywhere proves the check is global.
References are independent of the code under test: the weights and optimizer state read before
the step, compared bit for bit, and the loss read back from the device.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.dist import run_distributed

MODEL = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "16", "--make-vocab-size-divisible-by", "8",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2",
]  # fmt: skip
VOCAB = 64
POISONED = {2, 4, 5}  # 2 is skipped alone, 4-5 is the run that stops (max 2)
LAYOUTS = {  # name: (flags, tp, pp); world size 2
    "fp32-zero0-tp2": (["--zero-stage", "0"], 2, 1),
    "fp32-zero1-dp2": (["--zero-stage", "1"], 1, 1),
    "bf16-zero0-tp2": (["--bf16", "--zero-stage", "0"], 2, 1),
    "bf16-zero1-dp2": (["--bf16", "--zero-stage", "1"], 1, 1),
    "fp32-zero0-pp2": (["--zero-stage", "0"], 1, 2),
    "fp32-zero2-dp2": (["--zero-stage", "2"], 1, 1),
    "bf16-zero2-dp2": (["--bf16", "--zero-stage", "2"], 1, 1),
    "fp32-zero3-dp2": (["--zero-stage", "3"], 1, 1),
    "bf16-zero3-dp2": (["--bf16", "--zero-stage", "3"], 1, 1),
}


def _snapshot(engine) -> list[torch.Tensor]:
    """The model's weights, the optimizer's own (master) weights and its state, copied."""
    inner = engine.optimizer
    while hasattr(inner, "optimizer"):  # DeepSpeed's wrappers keep the torch optimizer inside
        inner = inner.optimizer
    # ZeRO-3: the module holds empty placeholders; this rank's shard is ``ds_tensor``
    out = [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]
    out += [p.detach().clone() for g in inner.param_groups for p in g["params"]]
    for state in inner.state.values():
        out += [v.detach().clone() for _, v in sorted(state.items()) if torch.is_tensor(v)]
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _micro_batches(iteration: int, topo, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 * iteration + topo.dp_rank)
    text = torch.randint(0, VOCAB, (n, 2, 17), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in text]


def _scenario(rank, world_size, layouts, iters=5):
    """Per layout: five steps with ``POISONED`` on rank 1; per step (loss, weights and optimizer
    state unchanged, ``engine.skipped_steps``), the stop (iteration, exit code), the messages."""
    import os

    from mtnlg.distributed.topology import ParallelDims, Topology
    from mtnlg.training.arguments import build_parser, model_config_from_args
    from mtnlg.training.loop import step_loss
    from mtnlg.training.nonfinite import NonFiniteGuard, NonFiniteStop
    from mtnlg.training.setup import batch_sizes, build_engine, resolve_ds_config

    os.environ["MTNLG_TEST_POISON_ITERS"] = ",".join(map(str, sorted(POISONED)))
    os.environ["MTNLG_TEST_POISON_RANK"] = "1"
    out = {}
    for name, (flags, tp, pp) in layouts.items():
        parallel = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size"]
        args = build_parser("test").parse_args([*MODEL, *flags, *parallel, str(pp)])
        dims = ParallelDims(world_size=world_size, tp=tp, pp=pp)
        ds_config = resolve_ds_config(args, dims, batch_sizes(args, dims))
        topo = Topology(dims)
        engine = build_engine(
            model_config_from_args(args, VOCAB), topo, ds_config, seed=3,
            checkpoint_activations=False, weight_decay=0.0,
        )  # fmt: skip
        said: list[str] = []
        guard = NonFiniteGuard(engine, topo.rank, world_size, max_consecutive=2, say=said.append)
        steps, stop = [], None
        for it in range(1, iters + 1):
            before = _snapshot(engine)
            with guard.step(it):
                loss = step_loss(engine, topo, _micro_batches(it, topo, 4 // (2 * topo.dp)))
            steps.append((loss.item(), _same(before, _snapshot(engine)), engine.skipped_steps))
            try:
                guard.stop_if_due(it)
            except NonFiniteStop as e:
                stop = (it, e.code)
                break
        out[name] = (steps, stop, said, type(engine.optimizer).__name__)
    return out


@pytest.fixture(scope="module")
def poisoned_runs() -> list[dict]:
    """Every layout, one after the other in the same two spawned ranks (one start-up)."""
    return run_distributed(
        _scenario, world_size=2, args=(LAYOUTS,), timeout=400, start_method="forkserver"
    )


@pytest.mark.timeout(450)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_poisoned_step_skipped_everywhere_and_stop(poisoned_runs, layout):
    pp = LAYOUTS[layout][2]
    for rank, runs in enumerate(poisoned_runs):
        steps, stop, said, opt = runs[layout]
        where = f"{layout} rank {rank} ({opt})"
        losses = [s[0] for s in steps]
        if rank == 1:  # the poisoned rank (and the pipeline's last stage, which has the loss)
            assert [math.isfinite(v) for v in losses] == [True, False, True, False, False], where
        elif pp == 1:  # TP rank 0 may see a finite loss: its skip comes from the global check
            assert math.isfinite(losses[0]) and math.isfinite(losses[2]), where
        # poisoned on rank 1 only, yet every rank left weights and optimizer state untouched
        assert [s[1] for s in steps] == [False, True, False, True, True], (where, steps)
        assert [s[2] for s in steps] == [0, 1, 1, 2, 3], (where, steps)  # engine.skipped_steps
        assert stop is not None and stop[0] == 5, (where, stop)
        if rank == 0:
            assert "stopping at iteration 5" in stop[1] and "(4-5;" in stop[1], stop
            assert "--max-consecutive-nonfinite 2" in stop[1]
            assert [m.split(":")[0] for m in said] == ["iteration 2", "iteration 4", "iteration 5"]
        else:
            assert stop[1] == 1 and said == []  # the message is rank 0's


def test_flag_default_and_bad_value(capsys):
    from mtnlg.training.arguments import build_parser
    from mtnlg.training.nonfinite import DEFAULT_MAX_CONSECUTIVE

    parser = build_parser("test")
    assert parser.parse_args([]).max_consecutive_nonfinite == DEFAULT_MAX_CONSECUTIVE
    assert parser.parse_args(["--max-consecutive-nonfinite", "0"]).max_consecutive_nonfinite == 0
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--max-consecutive-nonfinite", "-1"])
    assert e.value.code != 0
    assert "--max-consecutive-nonfinite" in capsys.readouterr().err


def test_fp16_overflow_counts_only_at_minimum_scale():
    """The rule that keeps fp16 loss scaling working, read from DeepSpeed's real scaler objects
    (fp16 engines are refused on the CPU, so the wrappers that hold them are stood in for)."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import (
        DynamicLossScaler,
        LossScaleConfig,
        LossScaleProfile,
        LossScaler,
    )

    from mtnlg.training.nonfinite import _scale_can_drop

    def zero(scaler):  # DeepSpeedZeroOptimizer.loss_scaler
        return SimpleNamespace(loss_scaler=scaler)

    dynamic = {"scale_window": 1000, "min_scale": 4, "delayed_shift": 1}
    assert _scale_can_drop(zero(DynamicLossScaler(8, consecutive_hysteresis=False, **dynamic)))
    assert not _scale_can_drop(zero(DynamicLossScaler(4, consecutive_hysteresis=False, **dynamic)))
    assert not _scale_can_drop(zero(LossScaler(128)))  # static: every overflow counts
    fp16 = LossScaleConfig(torch.float16, True, 1.0, None, profile=LossScaleProfile.UNFUSED)
    assert _scale_can_drop(SimpleNamespace(loss_scale_config=fp16))  # FP16_*Optimizer
    fp16.cur_scale = fp16.min_loss_scale
    assert not _scale_can_drop(SimpleNamespace(loss_scale_config=fp16))
    bf16 = LossScaleConfig(torch.bfloat16, True, 1.0, None, profile=LossScaleProfile.UNFUSED)
    assert not _scale_can_drop(SimpleNamespace(loss_scale_config=bf16))
    assert not _scale_can_drop(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]))
