"""Run `pretrain.py` for the equivalence tests and collect what they compare.

A :class:`Run` holds, per iteration, the loss and the gradient norm that the loop logs into its
JSON Lines metrics file (``--log-interval 1``), and the final weights of the ``--save``
checkpoint merged to TP=1 x PP=1 (fp32) by the converter's own reader (``DSCheckpoint``). Runs go
through ``run_distributed`` or, for :func:`launch`, the real ``deepspeed --hostfile`` launcher.

Inside spawned runs a global module forward hook (installed by the test, not a mock: the real
code runs unchanged) counts ``TransformerBlock`` forward calls made in training mode and records
the dtypes the blocks saw, so tests can prove activation recompute and bf16 really happened.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests.e2e.conftest import ROOT
from tests.e2e.test_pretrain import base_args
from tests.helpers.dist import deepspeed_cmd, run_distributed

ITERS = 6
"""Iterations of the layout runs (the schedule spans ``DECAY_ITERS`` whatever the run length)."""
DECAY_ITERS = 20


def equivalence_args(prefix: str, tp=1, pp=1, mb=2, iters=ITERS, dropout=0.0, extra=()):
    """Global batch 8, no clipping, every iteration logged, no evaluation.

    ``--clip-grad 0``: clipping would divide a wrongly scaled gradient back to norm 1.
    ``--adam-eps 1e-4``: comparable to the per-element gradients (rms ~3e-3), so Adam's update
    depends on the gradient's scale (with 1e-8 Adam normalises a constant factor away), and
    fp32 noise in exactly-zero gradients (the key bias: softmax ignores a per-query constant)
    is not amplified into lr-sized sign steps that differ between layouts.
    ``--lr-decay-iters``: a shorter run follows the first iterations of a longer one.
    """
    return base_args(
        prefix,
        tp=tp,
        pp=pp,
        iters=iters,
        gb=8,
        mb=mb,
        dropout=dropout,
        extra=[
            "--clip-grad",
            "0",
            "--adam-eps",
            "1e-4",
            "--lr-decay-iters",
            str(DECAY_ITERS),
            "--log-interval",
            "1",
            "--eval-interval",
            "0",
            *extra,
        ],
    )


@dataclass
class Run:
    losses: list[float]
    grad_norms: list[float]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    """Final weights merged to TP=1 x PP=1 (empty when the run saved nothing)."""
    layout: tuple[int, int, int] | None = None
    """(tp, pp, dp) recorded in the saved checkpoint."""
    block_calls: list[int] = field(default_factory=list)
    """Per rank: ``TransformerBlock`` forward calls in training mode (recompute included)."""
    dtypes: set[str] = field(default_factory=set)
    """Every (param dtype, input dtype, output dtype) the blocks saw, as strings."""


def read_metrics(path: Path) -> tuple[list[float], list[float]]:
    """(losses, grad norms) of every logged training iteration, in order."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "train"]
    assert [r["iteration"] for r in rows] == list(range(1, len(rows) + 1)), "log every iteration"
    norms = [r["grad_norm"] for r in rows]
    assert all(isinstance(n, float) and n > 0 for n in norms), f"grad norm not reported: {norms}"
    return [r["loss"] for r in rows], norms


def merged_weights(save_dir: Path, tag: str | None = None) -> tuple[dict, tuple[int, int, int]]:
    """Every parameter of a checkpoint (default: latest), TP shards and PP stages merged, fp32,
    and the (tp, pp, dp) it was saved at."""
    from mtnlg.checkpoint import rules
    from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint

    ckpt = DSCheckpoint(save_dir, tag)
    out = {}
    for group in rules.layer_groups(ckpt.cfg):
        out.update(dict(ckpt.iter_full_group(group)))
    return out, (ckpt.tp, ckpt.pp, ckpt.dp)


def _pretrain_observed(rank, world_size, argv):
    """Spawned body: run pretraining with a block-counting forward hook installed."""
    from mtnlg.model.layers import TransformerBlock
    from mtnlg.training.pretrain import run

    seen = {"calls": 0, "dtypes": set()}

    def hook(module, inputs, output):
        if isinstance(module, TransformerBlock) and module.training:
            seen["calls"] += 1
            param = next(module.parameters()).dtype
            seen["dtypes"].add((str(param), str(inputs[0].dtype), str(output.dtype)))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        run(argv)
    finally:
        handle.remove()
    return seen["calls"], seen["dtypes"]


def pretrain(
    argv: list[str], world_size: int, out: Path, save: bool = True, timeout: float = 480
) -> Run:
    """Spawn ``world_size`` ranks running ``argv``; metrics and checkpoint go under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    metrics, ckpt = out / "metrics.jsonl", out / "ckpt"
    argv = [*argv, "--metrics-file", str(metrics)] + (["--save", str(ckpt)] if save else [])
    seen = run_distributed(
        _pretrain_observed,
        world_size=world_size,
        args=(argv,),
        timeout=timeout,
        start_method="forkserver",
    )
    losses, norms = read_metrics(metrics)
    weights, layout = merged_weights(ckpt) if save else ({}, None)
    return Run(
        losses,
        norms,
        weights,
        layout,
        block_calls=[calls for calls, _ in seen],
        dtypes={"/".join(d) for _, ds in seen for d in ds},
    )


def launch(argv: list[str], nproc: int, out: Path, timeout: float = 540) -> Run:
    """The same through ``deepspeed --hostfile`` (a hostfile naming localhost slots=nproc)."""
    out.mkdir(parents=True, exist_ok=True)
    metrics, save, hostfile = out / "metrics.jsonl", out / "ckpt", out / "hostfile"
    hostfile.write_text(f"localhost slots={nproc}\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = deepspeed_cmd(
        ROOT / "mtnlg" / "pretrain.py",
        [*argv, "--metrics-file", metrics, "--save", save],
        hostfile,
    )
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    losses, norms = read_metrics(metrics)
    return Run(losses, norms, *merged_weights(save))


def max_rel(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want)
    return max(abs(g - w) / abs(w) for g, w in zip(got, want))


def max_abs_weight_diff(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max((got[k] - want[k]).abs().max().item() for k in want)


def assert_equivalent(
    got: Run, want: Run, loss_rtol: float, norm_rtol: float, weight_atol: float | None
) -> None:
    """Per-iteration loss and gradient norm, then every final weight (unless ``weight_atol``
    is None: no checkpoint to merge)."""
    assert len(got.losses) == len(want.losses)
    assert max_rel(got.losses, want.losses) <= loss_rtol, (got.losses, want.losses)
    assert max_rel(got.grad_norms, want.grad_norms) <= norm_rtol, (got.grad_norms, want.grad_norms)
    if weight_atol is None:
        return
    worst = max_abs_weight_diff(got.weights, want.weights)
    assert worst <= weight_atol, f"final weights differ by up to {worst:.3g}"
