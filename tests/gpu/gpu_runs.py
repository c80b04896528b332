"""Launch ``pretrain.py`` on CUDA GPUs for the ``gpu``-marked tests.

The root conftest sets ``DS_ACCELERATOR=cpu`` for the test process; these runs are
subprocesses started by the real ``deepspeed`` launcher with ``DS_ACCELERATOR=cuda`` (NCCL),
one rank per GPU, and read back through the CPU tests' helpers (metrics JSON Lines, the
converter's merged weights).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.e2e.pretrain_runs import Run, merged_weights, read_metrics
from tests.finetuning.ft_runs import run_group
from tests.helpers.dist import deepspeed_cmd

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = ROOT / "mtnlg" / "pretrain.py"


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def needs_gpus(n: int):
    """Skip unless ``n`` CUDA devices are visible (the reason names how many are)."""
    have = cuda_count()
    return pytest.mark.skipif(have < n, reason=f"needs {n} CUDA GPU(s), {have} visible")


def ds_json(tmp: Path, cfg: dict) -> str:
    path = tmp / "ds_config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def metric_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "train"]


# torch's AdamW, not DeepSpeed's FusedAdam: that one JIT-compiles a CUDA extension (a minute or
# more, and a toolchain that must match the installed torch) before the first step.
TORCH_ADAM = {"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}


def launch_gpu(
    argv: list[str], ngpus: int, out: Path, save: bool = True, ds: dict | None = None, timeout=600
) -> Run:
    """``deepspeed --hostfile`` (localhost slots=ngpus) running pretrain.py on CUDA, with
    ``ds`` (plus torch's AdamW) as its ``--deepspeed_config``."""
    out.mkdir(parents=True, exist_ok=True)
    metrics, ckpt, hostfile = out / "metrics.jsonl", out / "ckpt", out / "hostfile"
    hostfile.write_text(f"localhost slots={ngpus}\n")
    env = {**os.environ, "DS_ACCELERATOR": "cuda", "OMP_NUM_THREADS": "1"}
    argv = [
        *argv,
        "--metrics-file",
        metrics,
        "--deepspeed_config",
        ds_json(out, {**TORCH_ADAM, **(ds or {})}),
    ]
    argv += ["--save", ckpt] if save else []
    proc = run_group(deepspeed_cmd(PRETRAIN, argv, hostfile), env, timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses, norms = read_metrics(metrics)
    weights, layout = merged_weights(ckpt) if save else ({}, None)
    return Run(losses, norms, weights, layout)
