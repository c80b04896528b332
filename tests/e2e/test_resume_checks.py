"""Resume checks end to end (``mtnlg.training.resume``): real ``pretrain.run`` on 2 ranks (DP=2).

One run trains 4 of 8 iterations (lr 2e-3 -> 2e-4 cosine over 8, warmup 2) and saves; the
resumes below change ``--lr`` and are refused, or go on with the new schedule
(``--override-opt_param-scheduler``) or the old one (``--use-checkpoint-opt_param-scheduler``):
the LR of iteration 5, read from the JSON Lines metrics, is checked against Megatron's formula
written out here. ``--finetune`` restarts at iteration 0 with a fresh optimizer (the saved Adam
step proves it); ``--load`` of a missing path fails, of an empty folder trains from scratch.
The full matrix of settings is unit-tested in ``tests/unit/training/test_resume.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT
from tests.e2e.test_pretrain import base_args
from tests.helpers.dist import run_distributed

LR, MIN_LR, WARMUP, ITERS, SAVED = 2e-3, 2e-4, 2, 8, 4
NEW_LR = 1e-3


def cosine_lr(x: int, lr: float) -> float:
    """Megatron's warmup + cosine decay at step ``x`` (decay over the ITERS of the run)."""
    if x <= WARMUP:
        return lr * x / WARMUP
    progress = (x - WARMUP) / (ITERS - WARMUP)
    return MIN_LR + (lr - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))


def _run(rank, world_size, argv, distill=False):
    """One ``pretrain.run`` (or distillation's) on this rank: its progress or its exit code,
    and its stdout."""
    import contextlib
    import io

    from mtnlg.distillation import driver
    from mtnlg.training import pretrain

    run = driver.run if distill else pretrain.run

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            progress = run(argv)
            result = {"code": None, "iteration": progress.iteration, "losses": progress.losses}
        except SystemExit as e:
            result = {"code": e.code}
    return {**result, "stdout": out.getvalue()}


def pretrain(argv: list[str], world_size: int = 2, distill: bool = False) -> list[dict]:
    argv = [str(a) for a in argv]
    return run_distributed(
        _run, world_size, args=(argv, distill), timeout=400, start_method="forkserver"
    )


def train_rows(metrics: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["iteration"]: r for r in rows if r.get("kind") == "train"}


def adam_step(ckpt: Path) -> float:
    """The Adam step count in a checkpoint's (ZeRO) optimizer state."""
    from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint

    common = DSCheckpoint(ckpt).optimizer_common()
    return float(common["template"]["base_optimizer_state"]["state"][0]["step"])


def args(prefix: str, *extra: str) -> list[str]:
    return base_args(prefix, iters=ITERS, extra=["--log-interval", "1", *map(str, extra)])


@pytest.fixture(scope="module")
def saved(demo_prefix, tmp_path_factory):
    """Iterations 1-4 of 8, saved; the checkpoint folder and the metrics."""
    t = tmp_path_factory.mktemp("resume")
    ck, metrics = t / "ck", t / "first.jsonl"
    out = pretrain(
        args(demo_prefix, "--exit-interval", SAVED, "--save", ck, "--metrics-file", metrics)
    )
    assert out[0]["iteration"] == SAVED and (ck / "latest").read_text().strip() == "iter_0000004"
    return {"t": t, "ck": ck, "rows": train_rows(metrics)}


@pytest.mark.timeout(600)
def test_changed_lr_is_refused_by_rank_0_and_nothing_is_written(demo_prefix, saved):
    ck, metrics = saved["ck"], saved["t"] / "refused.jsonl"
    before = sorted(p.name for p in ck.iterdir())
    out = pretrain(
        args(demo_prefix, "--lr", NEW_LR, "--load", ck, "--save", ck, "--metrics-file", metrics)
    )
    msg = out[0]["code"]
    assert isinstance(msg, str) and msg.startswith(f"error: --load {ck}"), out
    assert "--lr: the checkpoint has 0.002, the command line gives 0.001" in msg
    assert "--override-opt_param-scheduler" in msg and "--use-checkpoint-opt_param-scheduler" in msg
    assert out[1]["code"] == 1 and out[1]["stdout"] == ""  # the other rank exits quietly
    assert sorted(p.name for p in ck.iterdir()) == before and not metrics.exists()
    # a model flag: refused too, before anything is built
    out = pretrain(args(demo_prefix, "--hidden-size", 128, "--load", ck))
    assert "--hidden-size: the checkpoint has 64, the command line gives 128" in out[0]["code"]


@pytest.mark.timeout(300)
def test_refusal_through_the_command_line_exits_non_zero(demo_prefix, saved):
    cmd = [sys.executable, str(ROOT / "mtnlg" / "pretrain.py")]
    cmd += args(demo_prefix, "--seed", 8, "--load", saved["ck"])
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "--seed: the checkpoint has 7, the command line gives 8" in proc.stderr
    assert "--override-data-stream" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "flag,lr",
    [("--override-opt_param-scheduler", NEW_LR), ("--use-checkpoint-opt_param-scheduler", LR)],
)
def test_scheduler_flags_choose_the_lr_of_the_next_iteration(demo_prefix, saved, flag, lr):
    t = saved["t"]
    metrics, again = t / f"{flag}.jsonl", t / f"{flag}-ck"
    extra = ["--lr", NEW_LR, flag, "--load", saved["ck"], "--exit-interval", SAVED + 1]
    extra += ["--metrics-file", metrics, "--save", again]
    out = pretrain(args(demo_prefix, *extra))
    assert out[0]["code"] is None and out[0]["iteration"] == SAVED + 1
    assert f"resumed from {saved['ck']} at iteration 4" in out[0]["stdout"]
    assert flag in out[0]["stdout"] and out[1]["stdout"] == ""  # the note, rank 0 only
    rows = train_rows(metrics)
    assert list(rows) == [SAVED + 1]
    # the step of iteration 5 is taken at x = 4; the two schedules differ there (8e-4, 1.55e-3)
    assert rows[SAVED + 1]["lr"] == pytest.approx(cosine_lr(SAVED, lr), rel=1e-12)
    assert cosine_lr(SAVED, NEW_LR) != pytest.approx(cosine_lr(SAVED, LR), rel=0.1)
    saved_lr = json.loads((again / "iter_0000005" / "mtnlg_meta.json").read_text())
    assert saved_lr["train"]["lr_schedule"]["lr"] == lr  # the schedule it trained with
    assert adam_step(again) == SAVED + 1  # the optimizer state was loaded


@pytest.mark.timeout(600)
def test_finetune_restarts_at_iteration_0_without_the_optimizer(demo_prefix, saved):
    t = saved["t"]
    ft, metrics = t / "ft", t / "ft.jsonl"
    extra = ["--load", saved["ck"], "--finetune", "--lr", NEW_LR]  # a new schedule: accepted
    extra += ["--exit-interval", 2, "--save", ft, "--metrics-file", metrics]
    out = pretrain(args(demo_prefix, *extra))
    assert out[0]["code"] is None and out[0]["iteration"] == 2
    assert "--finetune: loaded the weights of" in out[0]["stdout"]
    rows = train_rows(metrics)
    assert list(rows) == [1, 2] and rows[2]["lr"] == pytest.approx(cosine_lr(1, NEW_LR))
    meta = json.loads((ft / "iter_0000002" / "mtnlg_meta.json").read_text())
    assert meta["progress"]["iteration"] == 2 and meta["progress"]["consumed_samples"] == 16
    assert adam_step(ft) == 2 and adam_step(saved["ck"]) == SAVED  # fresh Adam, not 4 + 2
    # the weights were loaded: on the same first batch (consumed 0, same seed) the trained
    # model's loss is below the random initialization's
    assert rows[1]["loss"] < saved["rows"][1]["loss"] - 0.05, (rows[1], saved["rows"][1])


@pytest.mark.timeout(600)
def test_load_missing_path_fails_and_empty_folder_trains_from_scratch(demo_prefix, saved):
    t = saved["t"]
    missing = t / "missing"
    out = pretrain(args(demo_prefix, "--load", missing))
    assert out[0]["code"] == f"error: --load {missing}: no such folder" and out[1]["code"] == 1
    empty, metrics = t / "empty", t / "empty.jsonl"
    empty.mkdir()
    out = pretrain(
        args(demo_prefix, "--load", empty, "--exit-interval", 1, "--metrics-file", metrics)
    )
    assert out[0]["code"] is None and out[0]["iteration"] == 1
    assert f"warning: --load {empty}: no checkpoint there" in out[0]["stdout"]
    assert "warning" not in out[1]["stdout"]
    # from scratch: iteration 1 is the first run's iteration 1 (same seed, data and init)
    assert train_rows(metrics)[1]["loss"] == saved["rows"][1]["loss"]


@pytest.mark.timeout(600)
def test_distillation_resume_is_checked_too(demo_prefix, saved):
    """The student's own checkpoint: a changed --lr or student shape is refused (before the
    teacher loads), the same flags resume."""
    student = saved["t"] / "student"
    dargs = args(demo_prefix, "--global-batch-size", 4, "--lr", 1e-3)
    drop = {"--num-layers", "--hidden-size", "--num-attention-heads"}  # the teacher's shape
    dargs = [a for i, a in enumerate(dargs) if a not in drop and dargs[i - 1] not in drop]
    dargs += ["--teacher", str(saved["ck"]), "--student-num-layers", "2"]
    out = pretrain([*dargs, "--exit-interval", 2, "--save", student], 1, distill=True)
    assert out[0]["iteration"] == 2, out
    refused = {
        ("--lr", 2e-3): "--lr: the checkpoint has 0.001, the command line gives 0.002",
        ("--student-num-layers", 3): "--student-num-layers: the checkpoint has 2, the command "
        "line gives 3",
    }
    for (flag, value), line in refused.items():
        out = pretrain([*dargs, flag, value, "--load", student], 1, distill=True)
        assert line in out[0]["code"], out
    out = pretrain([*dargs, "--exit-interval", 3, "--load", student], 1, distill=True)
    assert out[0]["iteration"] == 3 and f"resumed from {student}" in out[0]["stdout"]
