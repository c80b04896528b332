"""A `deepspeed pretrain.py` job run in the background, so a test can hurt it from outside.

The job is the real launcher (``deepspeed.launcher.runner`` -> ``deepspeed.launcher.launch`` ->
one ``pretrain.py`` per rank) in its own session, so one ``killpg`` ends every process it
started whatever happened. Ranks are found as the launcher's descendants (their ``RANK``), the
progress by reading the rank-0 metrics file; the faults themselves (``kill -9``, SIGSTOP,
SIGTERM) are plain signals sent by the test. Used by ``tests/faults/test_kill.py``,
``test_preempt.py`` and ``bench/bench_faults.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from mtnlg.training.metrics import read_metrics
from tests.e2e.conftest import ROOT, TINY_MERGES, TINY_VOCAB
from tests.helpers.dist import deepspeed_cmd

ITERS = 8


def fault_args(prefix: str, iters: int = ITERS, extra=()) -> list[str]:
    """A tiny GPT (2 layers, hidden 64) at TP=2 on 2 ranks, every iteration logged, no eval."""
    return [
        "--tensor-model-parallel-size", "2",
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--make-vocab-size-divisible-by", "8",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(iters),
        "--lr", "2e-3", "--min-lr", "2e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", "2", "--lr-decay-iters", "20", "--seed", "7",
        "--data-path", prefix, "--split", "95,5,0",
        "--vocab-file", str(TINY_VOCAB), "--merge-file", str(TINY_MERGES),
        "--log-interval", "1", "--eval-interval", "0", "--no-progress",
        *extra,
    ]  # fmt: skip


class Job:
    """``deepspeed --hostfile`` (2 slots on localhost) running ``pretrain.py argv``; metrics
    in ``out/metrics.jsonl``, launcher output in ``out/launcher.log``."""

    def __init__(self, argv: list[str], out: Path, nproc: int = 2) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.metrics = out, out / "metrics.jsonl"
        hostfile = out / "hostfile"
        hostfile.write_text(f"localhost slots={nproc}\n")
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        cmd = deepspeed_cmd(
            ROOT / "mtnlg" / "pretrain.py", [*argv, "--metrics-file", self.metrics], hostfile
        )
        self._log = open(out / "launcher.log", "w")  # noqa: SIM115 - closed in wait/kill
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.nproc = nproc
        self._ranks: dict[int, psutil.Process] = {}

    def iterations(self) -> dict[int, dict]:
        """Logged training records by iteration (empty before the first)."""
        if not self.metrics.is_file():
            return {}
        return {r["iteration"]: r for r in read_metrics(str(self.metrics), "train")}

    def wait_for_iteration(self, k: int, timeout: float = 120) -> None:
        """Until rank 0 has logged iteration ``k``; the job must still be running."""
        deadline = time.monotonic() + timeout
        while max(self.iterations(), default=0) < k:
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended (rc {self.proc.returncode}) before iteration {k}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"iteration {k} not logged within {timeout}s: {self.log()}")
            time.sleep(0.02)

    def ranks(self) -> dict[int, psutil.Process]:
        """The ``pretrain.py`` processes by global rank (found once, kept afterwards)."""
        if len(self._ranks) < self.nproc:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    if "pretrain.py" in " ".join(p.cmdline()):
                        self._ranks[int(p.environ()["RANK"])] = p
                except (psutil.Error, KeyError):
                    continue
        return self._ranks

    def signal_rank(self, rank: int, sig: signal.Signals) -> float:
        """Send ``sig`` to one rank from outside; returns when it was sent (monotonic)."""
        os.kill(self.ranks()[rank].pid, sig)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        """The launcher's exit status; on timeout every process of the job is killed."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL every process of the job (its session), then reap the launcher."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self._log.close()

    def alive_ranks(self) -> list[int]:
        """Ranks still running (zombies waiting for their parent count as gone)."""
        alive = []
        for rank, p in self.ranks().items():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(rank)
            except psutil.NoSuchProcess:
                pass
        return alive

    def log(self) -> str:
        return (self.out / "launcher.log").read_text(errors="replace")[-4000:]

    def latest(self, save: Path) -> str | None:
        path = save / "latest"
        return path.read_text().strip() if path.is_file() else None


def losses_and_norms(job: Job) -> dict[int, tuple[float, float]]:
    """(loss, grad norm) by iteration, as rank 0 logged them."""
    return {k: (r["loss"], r["grad_norm"]) for k, r in job.iterations().items()}


def run_to_end(argv: list[str], out: Path, timeout: float = 300) -> dict[int, tuple]:
    """A job that must finish with exit status 0; its (loss, grad norm) by iteration."""
    job = Job(argv, out)
    try:
        rc = job.wait(timeout)
    finally:
        job.kill()
    assert rc == 0, job.log()
    return losses_and_norms(job)
