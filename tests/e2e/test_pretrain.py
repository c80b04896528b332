"""Pretraining end to end: exact resume, launcher and crash during save, ramp-up, bad flags.

Layouts, ZeRO stages, activation checkpointing and bf16 against their references (loss,
gradient norm and final weights) are in ``test_equivalence.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT, TINY_MERGES, TINY_VOCAB
from tests.helpers.dist import deepspeed_cmd, free_port, run_distributed

ITERS = 10
DROP = 0.1


def base_args(prefix: str, tp=1, pp=1, iters=ITERS, gb=8, mb=2, dropout=0.0, extra=()):
    return [
        "--tensor-model-parallel-size",
        str(tp),
        "--pipeline-model-parallel-size",
        str(pp),
        "--num-layers",
        "4",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "32",
        "--make-vocab-size-divisible-by",
        "8",
        "--hidden-dropout",
        str(dropout),
        "--attention-dropout",
        str(dropout),
        "--micro-batch-size",
        str(mb),
        "--global-batch-size",
        str(gb),
        "--train-iters",
        str(iters),
        "--lr",
        "2e-3",
        "--min-lr",
        "2e-4",
        "--lr-decay-style",
        "cosine",
        "--lr-warmup-iters",
        "2",
        "--weight-decay",
        "0.1",
        "--adam-beta2",
        "0.95",
        "--clip-grad",
        "1.0",
        "--seed",
        "7",
        "--data-path",
        prefix,
        "--split",
        "95,5,0",
        "--vocab-file",
        str(TINY_VOCAB),
        "--merge-file",
        str(TINY_MERGES),
        "--log-interval",
        "5",
        "--eval-interval",
        "1000",
        "--eval-iters",
        "1",
        "--no-progress",
        *extra,
    ]


def _pretrain(rank, world_size, argv):
    from mtnlg.training.pretrain import run

    progress = run(argv)
    return [loss for _, loss in progress.losses]


def losses(argv, world_size, timeout=300):
    out = run_distributed(
        _pretrain, world_size=world_size, args=(argv,), timeout=timeout, start_method="forkserver"
    )
    assert all(o == out[0] for o in out), "ranks disagree on the loss"
    return out[0]


@pytest.mark.timeout(600)
def test_resume_is_exact_with_dropout(demo_prefix, tmp_path):
    """20 iterations straight == 10, save, resume, 10 more: bit for bit (CPU fp32)."""
    save = str(tmp_path / "ckpt")
    args = base_args(demo_prefix, pp=2, iters=20, dropout=DROP)
    straight = losses(args + ["--save", save, "--save-interval", "10"], 2)
    first = losses(
        base_args(
            demo_prefix,
            pp=2,
            iters=20,
            dropout=DROP,
            extra=["--save", str(tmp_path / "b"), "--exit-interval", "10"],
        ),
        2,
    )
    resumed = losses(args + ["--load", str(tmp_path / "b")], 2)
    assert first == straight[:10]
    assert resumed == straight[10:]


def _launch(argv, env_extra=None, nproc=2, timeout=400):
    hostfile = ROOT / "launch" / "hostfile.localhost"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = deepspeed_cmd(ROOT / "mtnlg" / "pretrain.py", argv, hostfile, num_gpus=nproc)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(900)
def test_deepspeed_launcher_and_crash_during_save(demo_prefix, tmp_path):
    """Real `deepspeed --hostfile` launch; a crash mid-save leaves a resumable checkpoint."""
    save = tmp_path / "ckpt"
    args = base_args(
        demo_prefix, tp=2, iters=8, extra=["--save", str(save), "--save-interval", "4"]
    )
    crashed = _launch(args, {"MTNLG_TEST_DIE_BEFORE_LATEST": "8"})
    assert crashed.returncode != 0
    assert (save / "latest").read_text().strip() == "iter_0000004"  # `latest` did not move
    resumed = _launch(args + ["--load", str(save)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "iteration 8/8" in resumed.stdout
    assert (save / "latest").read_text().strip() == "iter_0000008"


@pytest.mark.parametrize(
    "extra,flag",
    [
        (["--global-batch-size", "7"], "--global-batch-size"),
        (["--pipeline-model-parallel-size", "2", "--zero-stage", "2"], "ZeRO stage 2"),
        (["--data-path", "/nonexistent/prefix"], "/nonexistent/prefix"),
        (
            [
                "--num-attention-heads",
                "3",
                "--hidden-size",
                "48",
                "--tensor-model-parallel-size",
                "2",
            ],
            "--num-attention-heads",
        ),
    ],
)
def test_bad_configs_fail_fast(demo_prefix, extra, flag):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "mtnlg" / "pretrain.py"), *base_args(demo_prefix), *extra],
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert flag in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _pretrain_metrics(rank, world_size, argv, metrics):
    from mtnlg.training.pretrain import run

    run(argv + ["--metrics-file", metrics])
    return None


@pytest.mark.timeout(600)
def test_rampup_and_bf16(demo_prefix, tmp_path):
    """Batch ramp 4 -> 8 by 2 over 24 samples (MT-NLG style), in bf16 on the CPU."""
    import json

    metrics = str(tmp_path / "m.jsonl")
    argv = base_args(
        demo_prefix,
        gb=8,
        mb=2,
        extra=["--rampup-batch-size", "4", "2", "24", "--log-interval", "1", "--bf16"],
    )
    run_distributed(
        _pretrain_metrics,
        world_size=1,
        args=(argv, metrics),
        timeout=300,
        start_method="forkserver",
    )
    rows = [json.loads(line) for line in open(metrics) if '"train"' in line]
    batches = [r["global_batch"] for r in rows]
    # 24 samples over (8-4)/2 = 2 increments: 4 until 12 samples, 6 until 24, then 8
    assert batches[:6] == [4, 4, 4, 6, 6, 8] and set(batches[6:]) == {8}
    consumed = [r["consumed_samples"] for r in rows]
    assert consumed[:6] == [4, 8, 12, 18, 24, 32]
    losses_bf16 = [r["loss"] for r in rows]
    assert all(x == x and x < 20 for x in losses_bf16)  # finite
    assert losses_bf16[-1] < losses_bf16[0]


def _logged_losses(stdout: str) -> list[str]:
    return [
        line.split("| loss ")[1].split(" ")[0]
        for line in stdout.splitlines()
        if line.startswith("iteration ") and "| loss " in line
    ]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_and_mpirun_launch(demo_prefix):
    """The same run under torchrun and under mpirun (mpi4py discovery) logs the same losses."""
    bindir = os.path.dirname(sys.executable)
    argv = [str(ROOT / "mtnlg" / "pretrain.py"), *base_args(demo_prefix, tp=2, iters=3)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    runs = {
        "torchrun": [
            os.path.join(bindir, "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            *argv,
        ],
        "mpirun": [
            os.path.join(bindir, "mpirun"),
            "-np",
            "2",
            "--allow-run-as-root",
            "--map-by",
            "slot:OVERSUBSCRIBE",
            "-x",
            "DS_ACCELERATOR",
            "-x",
            "OMP_NUM_THREADS",
            sys.executable,
            *argv,
        ],
    }
    logged = {}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        logged[name] = _logged_losses(proc.stdout)
    assert len(logged["torchrun"]) == 1 and logged["torchrun"] == logged["mpirun"]
