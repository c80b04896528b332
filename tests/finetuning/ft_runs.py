"""Run ``finetune.py`` for the fine-tuning tests and collect what they compare.

Runs go through ``run_distributed`` (spawned ranks calling ``mtnlg.finetuning.run.run``) or the
real ``deepspeed`` launcher; per-iteration losses and gradient norms come from the metrics JSON
Lines file (``--log-interval 1``) through the pretraining tests' reader, final weights from the
saved checkpoint merged to TP=1 x PP=1 by the converter's reader (``ClassifierCheckpoint``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import ROOT, TINY_MERGES, TINY_VOCAB
from tests.e2e.pretrain_runs import Run, read_metrics
from tests.helpers.dist import deepspeed_cmd, run_distributed

SST2 = ROOT / "data" / "sst2"
FINETUNE = ROOT / "mtnlg" / "finetune.py"
ITERS = 6


def sst2_sample(out: Path, split: str, n: int) -> Path:
    """The first ``n`` records of the real SST-2 ``split`` (header kept)."""
    lines = (SST2 / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    path = out / f"{split}.tsv"
    path.write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    return path


def model_args(tp=1, pp=1, seq=32) -> list[str]:
    """A 4-layer 64-wide GPT on the 5,000-token GPT-2 BPE, random init, dropout 0."""
    return [
        "--tensor-model-parallel-size", str(tp),
        "--pipeline-model-parallel-size", str(pp),
        "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", str(seq), "--make-vocab-size-divisible-by", "8",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--vocab-file", str(TINY_VOCAB), "--merge-file", str(TINY_MERGES),
        "--no-progress",
    ]  # fmt: skip


def classification_args(train: Path, dev: Path, tp=1, pp=1, mb=2, iters=ITERS, extra=()):
    """Global batch 8, fp32, no clipping, Adam eps 1e-4 (see ``equivalence_args`` in
    tests/e2e/pretrain_runs.py for why), every iteration logged, dev evaluated at 3 and 6."""
    return [
        "--task", "classification", "--train-data", str(train), "--valid-data", str(dev),
        "--truncate", *model_args(tp, pp),
        "--micro-batch-size", str(mb), "--global-batch-size", "8", "--train-iters", str(iters),
        "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "1", "--lr-decay-iters", "20",
        "--weight-decay", "0.1", "--clip-grad", "0", "--adam-eps", "1e-4", "--seed", "7",
        "--log-interval", "1", "--eval-interval", "3", *extra,
    ]  # fmt: skip


def _finetune_body(rank, world_size, argv):
    from mtnlg.finetuning.run import run

    outcome = run(argv)
    return outcome.evals if outcome is not None else None


def finetune(argv: list[str], world_size: int, out: Path, timeout: float = 400):
    """Spawn ``world_size`` ranks; returns (Run with losses and norms, evaluations)."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    argv = [*argv, "--metrics-file", str(metrics)]
    evals = run_distributed(
        _finetune_body,
        world_size=world_size,
        args=(argv,),
        timeout=timeout,
        start_method="forkserver",
    )
    losses, norms = read_metrics(metrics)
    return Run(losses, norms), evals[0]


def launch(argv: list[str], nproc: int, out: Path, timeout: float = 400) -> Run:
    """The same through ``deepspeed --hostfile`` (localhost slots=nproc)."""
    out.mkdir(parents=True, exist_ok=True)
    metrics, hostfile = out / "metrics.jsonl", out / "hostfile"
    hostfile.write_text(f"localhost slots={nproc}\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = deepspeed_cmd(FINETUNE, [*argv, "--metrics-file", metrics], hostfile)
    proc = run_group(cmd, env, timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    losses, norms = read_metrics(metrics)
    return Run(losses, norms)


def run_group(cmd: list, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a new session whose whole process group (the launcher's ranks
    included) is killed on timeout, so a hung run leaves nothing behind."""
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s:\n{out[-2000:]}{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def eval_records(metrics: Path) -> list[dict]:
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "eval"]


def run_cli(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """``python mtnlg/finetune.py ARGV`` as a user runs it (one process, no launcher)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return run_group([sys.executable, FINETUNE, *argv], env, timeout)


def classifier_weights(ckpt: Path) -> dict:
    """Every tensor of a classifier checkpoint (head included), merged to TP=1 x PP=1, fp32."""
    from mtnlg.checkpoint.classification import ClassifierCheckpoint

    return ClassifierCheckpoint(ckpt).full_state()
