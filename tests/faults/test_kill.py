"""Issue 16, fault 1: a rank dies or hangs under the real `deepspeed` launcher.

``kill -9`` of one rank mid-iteration: DeepSpeed's per-node launcher (``launch.py``) polls its
children every second, sees the non-zero status, SIGTERMs the others (SIGKILL after 30 s) and
exits with the dead rank's status; gloo also fails the survivors' pending collective at once.
Resuming from the last complete checkpoint reproduces the uninterrupted run exactly.

A peer that stops answering without dying (SIGSTOP: a frozen node, a lost link) is not seen by
the launcher; the survivors' collective fails after ``--distributed-timeout-minutes``, which
must hold for the TP/PP/DP groups DeepSpeed creates, not only the world group (before, they
kept torch's 30-minute default and the job hung).
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.launched import ITERS, Job, fault_args, losses_and_norms, run_to_end

LAUNCHER_GRACE = 30
"""launch.py's wait between SIGTERM and SIGKILL of the surviving ranks (DeepSpeed 0.19)."""


@pytest.mark.timeout(400)
def test_killed_rank_ends_the_job_and_resume_is_exact(demo_prefix, reference, tmp_path):
    save = tmp_path / "ckpt"
    flags = ["--save", str(save), "--save-interval", "2", "--distributed-timeout-minutes", "1"]
    job = Job(fault_args(demo_prefix, extra=flags), tmp_path / "killed")
    try:
        job.wait_for_iteration(3)  # iterations 2 saved, 4 in flight
        killed_at = job.signal_rank(1, signal.SIGKILL)
        rc = job.wait(timeout=LAUNCHER_GRACE + 60)
        exited_after = time.monotonic() - killed_at
        alive = job.alive_ranks()
    finally:
        job.kill()
    assert rc != 0, job.log()
    assert exited_after < LAUNCHER_GRACE + 5, f"launcher exited {exited_after:.1f}s after kill"
    assert alive == [], f"ranks {alive} outlived the launcher"
    logged = losses_and_norms(job)
    assert all(logged[k] == reference[k] for k in logged)  # before the kill: the same run

    tag = job.latest(save)  # the last complete checkpoint: 2, or 4 if its save had finished
    assert tag in ("iter_0000002", "iter_0000004"), tag
    start = int(tag.split("_")[1])
    resumed = run_to_end(
        fault_args(demo_prefix, extra=["--load", str(save), "--save", str(save)]),
        tmp_path / "resumed",
    )
    assert sorted(resumed) == list(range(start + 1, ITERS + 1))
    assert resumed == {k: reference[k] for k in resumed}  # losses and grad norms, bit for bit


@pytest.mark.timeout(300)
def test_hung_peer_fails_within_the_distributed_timeout(demo_prefix, tmp_path):
    timeout_s = 6
    flags = ["--distributed-timeout-minutes", str(timeout_s / 60)]
    job = Job(fault_args(demo_prefix, iters=40, extra=flags), tmp_path / "hung")
    try:
        job.wait_for_iteration(2)
        stopped_at = job.signal_rank(1, signal.SIGSTOP)  # alive to the launcher, silent to rank 0
        survivor = job.ranks()[0]
        survivor.wait(timeout=timeout_s + 60)
        survivor_after = time.monotonic() - stopped_at
        job.signal_rank(1, signal.SIGCONT)  # so the launcher's SIGTERM reaches it
        rc = job.wait(timeout=LAUNCHER_GRACE + 30)
        alive = job.alive_ranks()
    finally:
        job.kill()
    assert survivor_after < timeout_s + 20, f"rank 0 exited {survivor_after:.1f}s after the stop"
    assert rc != 0 and alive == []
    assert f"Timed out waiting {timeout_s * 1000}ms" in job.log()
