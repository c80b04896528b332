"""Issue 16, fault 2: preemption (Megatron's ``--exit-signal-handler``) under `deepspeed`.

SIGTERM to one rank only (the hardest case for agreement: the other rank never sees a signal):
every rank stops after the same iteration, the checkpoint of that iteration is saved, the ranks
exit 0 and so does the launcher; resuming reproduces the uninterrupted run bit for bit.

SIGTERM to the whole job (``kill -TERM -- -PGID``, what SLURM does to a job step's processes):
the checkpoint is saved the same way, but the launcher cannot exit 0 (DeepSpeed 0.19): the
single-node ``deepspeed`` runner installs no handler and dies of the signal at once (status
-SIGTERM, 143 in a shell), while ``launch.py`` forwards SIGTERM to the ranks, waits up to 30 s
for them and exits 1 whatever they returned.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.launched import ITERS, Job, fault_args, losses_and_norms, run_to_end


def _preempted(prefix, tmp_path, send) -> tuple[Job, int, float, int]:
    """Start a job with the handler, ``send(job)`` a signal at iteration 2; (job, launcher
    status, seconds from the signal to the launcher's exit, iteration the checkpoint holds)."""
    save = tmp_path / "ckpt"
    argv = fault_args(prefix, extra=["--save", str(save), "--exit-signal-handler"])
    job = Job(argv, tmp_path / "preempted")
    try:
        job.wait_for_iteration(2)
        sent = send(job)
        rc = job.wait(timeout=120)
        took = time.monotonic() - sent
        deadline = time.monotonic() + 60  # the runner may exit before the ranks do
        while job.alive_ranks() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job.alive_ranks() == []
    finally:
        job.kill()
    tag = job.latest(save)
    assert tag is not None, job.log()
    return job, rc, took, int(tag.split("_")[1])


@pytest.mark.timeout(400)
def test_sigterm_to_one_rank_saves_exits_0_and_resumes_exactly(demo_prefix, reference, tmp_path):
    job, rc, _, stopped = _preempted(
        demo_prefix, tmp_path, lambda j: j.signal_rank(1, signal.SIGTERM)
    )
    assert rc == 0, job.log()
    assert 2 <= stopped < ITERS, f"stopped at {stopped}: the signal came too late to test"
    assert f"exiting at iteration {stopped} on SIGTERM: checkpoint saved" in job.log()
    logged = losses_and_norms(job)
    assert sorted(logged) == list(range(1, stopped + 1))  # rank 0 stopped with rank 1
    assert logged == {k: reference[k] for k in logged}

    save = tmp_path / "ckpt"
    resumed = run_to_end(
        fault_args(demo_prefix, extra=["--load", str(save), "--save", str(save)]),
        tmp_path / "resumed",
    )
    assert sorted(resumed) == list(range(stopped + 1, ITERS + 1))
    assert resumed == {k: reference[k] for k in resumed}  # losses and grad norms, bit for bit


def _signal_job(job: Job) -> float:
    import os

    job.ranks()  # found before the runner, their ancestor, is gone
    os.killpg(job.proc.pid, signal.SIGTERM)
    return time.monotonic()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_the_whole_job_saves_but_the_launcher_reports_it(demo_prefix, tmp_path):
    job, rc, _, stopped = _preempted(demo_prefix, tmp_path, _signal_job)
    assert rc == -signal.SIGTERM  # the runner died of it (see the module docstring)
    assert 2 <= stopped < ITERS
    assert f"exiting at iteration {stopped} on SIGTERM: checkpoint saved" in job.log()


def test_handler_records_the_signal_and_restores_the_previous_one():
    import os

    from mtnlg.training.signals import ExitSignalHandler

    before = signal.getsignal(signal.SIGUSR1)
    with ExitSignalHandler(signal.SIGUSR1) as handler:
        assert not handler.should_exit(device=None)  # no process group: the local flag
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        assert handler.received and handler.should_exit(device=None)
    assert signal.getsignal(signal.SIGUSR1) is before
