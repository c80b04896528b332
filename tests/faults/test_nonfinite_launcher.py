"""Non-finite steps end to end under the real ``deepspeed`` launcher (issue 16, fault 3).

DP 2, fp32 without ZeRO (the path DeepSpeed itself does not check), NaN poisoned into DP rank 1's
forward at iterations 3, 5 and 6 with ``--max-consecutive-nonfinite 2``: iteration 3 is skipped
and training goes on, 5-6 stop the job non-zero at iteration 6 before its scheduled save.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtnlg.training.metrics import read_metrics
from tests.e2e.conftest import ROOT, demo_prefix  # noqa: F401 - the fixture
from tests.e2e.pretrain_runs import merged_weights
from tests.e2e.test_pretrain import base_args
from tests.finetuning.ft_runs import run_group
from tests.helpers.dist import deepspeed_cmd


def _poisoned_launch(argv, poison: str, nproc: int, accelerator="cpu") -> str:
    """``deepspeed`` running pretrain.py with ``poison`` on the last rank; the job's output."""
    import os

    env = {**os.environ, "DS_ACCELERATOR": accelerator, "OMP_NUM_THREADS": "1"}
    env["MTNLG_TEST_POISON_ITERS"] = poison
    hostfile = ROOT / "launch" / "hostfile.localhost"
    cmd = deepspeed_cmd(ROOT / "mtnlg" / "pretrain.py", argv, hostfile, num_gpus=nproc)
    proc = run_group(cmd, env, timeout=500)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    return log


@pytest.mark.timeout(600)
def test_launcher_skips_poisoned_steps_then_stops(demo_prefix, tmp_path):  # noqa: F811
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    flags = ["--zero-stage", "0", "--log-interval", "1", "--eval-interval", "0"]
    flags += ["--save", save, "--save-interval", "2", "--metrics-file", metrics]
    argv = base_args(demo_prefix, iters=8, extra=[*flags, "--max-consecutive-nonfinite", "2"])
    log = _poisoned_launch(argv, "3,5,6", nproc=2)
    assert "stopping at iteration 6" in log and "(5-6;" in log, log[-3000:]
    assert "iteration 3: non-finite loss or gradients" in log

    rows = read_metrics(str(metrics), "train")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]  # 6 logged before the stop
    finite = [math.isfinite(r["loss"]) for r in rows]
    assert finite == [True, True, False, True, False, False], rows
    assert [r["skipped_iters"] for r in rows] == [0, 0, 1, 1, 2, 3]
    # the iteration-6 save never happened: `latest` is the last good one, and it is finite
    assert (save / "latest").read_text().strip() == "iter_0000004"
    assert not (save / "iter_0000006").exists()
    weights, _ = merged_weights(save)
    assert all(torch.isfinite(w).all() for w in weights.values())
