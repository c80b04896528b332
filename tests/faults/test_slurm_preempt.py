"""The SLURM batch file's time-limit path, run for real except SLURM itself (not installed).

``launch/slurm_mtnlg_530b.sbatch`` asks SLURM for SIGUSR1 before ``--time`` (``--signal=B:USR1``:
to the batch shell only), traps it and sends SIGTERM to the training ranks on every host (over
``pdsh``). Here the batch file runs as a plain script on one "node" (localhost) with the real
``deepspeed`` launcher training a tiny GPT on 2 ranks (``TRAIN_SCRIPT``), ``scontrol`` and
``pdsh`` stood in for by one-liners (hostname expansion; run the command on this host). The
test sends SIGUSR1 to the batch shell, as SLURM would: the ranks must save the iteration they
finished and exit 0, and so must the launcher and the batch job.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time

import pytest

from mtnlg.training.metrics import read_metrics
from tests.e2e.conftest import ROOT, demo_prefix  # noqa: F401 - the fixture
from tests.faults.launched import fault_args
from tests.helpers.dist import deepspeed_cmd
from tests.multinode.launch_flags import copy_tree

ITERS = 400  # far more than the test waits for: the stop must come from the signal


def _stubs(bin_dir) -> None:
    bin_dir.mkdir()
    stubs = {
        "scontrol": '[ "$1 $2" = "show hostnames" ] && echo "$3" | tr , "\\n"',
        "pdsh": 'eval "${@: -1}"',  # every host is this one: run the remote command here
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)


@pytest.mark.timeout(300)
def test_sbatch_time_limit_signal_saves_and_exits_0(demo_prefix, tmp_path):  # noqa: F811
    tree = copy_tree(tmp_path)
    _stubs(tree / "bin")
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    argv = fault_args(demo_prefix, iters=ITERS, extra=["--save", save, "--exit-signal-handler",
                                                       "--metrics-file", metrics])  # fmt: skip
    hostfile = tree / "logs" / "hostfile-7"  # the one the batch file writes
    cmd = deepspeed_cmd(ROOT / "mtnlg" / "pretrain.py", argv, hostfile)
    (tree / "train.sh").write_text("exec " + shlex.join(map(str, cmd)) + "\n")
    env = {
        **os.environ, "PATH": f"{tree / 'bin'}:{os.environ['PATH']}", "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "7",
        "SLURM_SUBMIT_DIR": str(tree), "GPUS_PER_NODE": "2", "TRAIN_SCRIPT": "train.sh",
    }  # fmt: skip
    batch = tree / "launch" / "slurm_mtnlg_530b.sbatch"
    log = open(tmp_path / "job.log", "w")  # noqa: SIM115 - closed below
    job = subprocess.Popen(["bash", str(batch)], env=env, cwd=tree, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 200
        while not (metrics.exists() and len(read_metrics(str(metrics), "train")) >= 2):
            assert job.poll() is None and time.monotonic() < deadline, tmp_path / "job.log"
            time.sleep(0.2)
        os.kill(job.pid, signal.SIGUSR1)  # SLURM's --signal=B:USR1@900, to the batch shell
        rc = job.wait(timeout=150)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        log.close()
    out = (tmp_path / "job.log").read_text()
    assert rc == 0, out[-4000:]
    assert "time limit near: SIGTERM to the ranks" in out, out[-4000:]
    stopped = int((save / "latest").read_text().strip().split("_")[1])
    assert 2 <= stopped < ITERS, out[-4000:]
    assert f"exiting at iteration {stopped} on SIGTERM: checkpoint saved" in out
    assert "launcher status 0" in out
    rows = read_metrics(str(metrics), "train")
    assert rows[-1]["iteration"] == stopped  # nothing trained after the checkpoint
