"""The fine-tuning loop: epochs over a list of examples, dev evaluation, best checkpoint.

Each optimizer step is ``mtnlg.training.loop.step_loss`` (plain or pipeline engine), the LR
schedule is pretraining's, logs go through ``MetricsLogger`` and checkpoints through
``mtnlg.training.checkpointing``. Sample order is a pure function of (number of examples, seed):
epoch e visits a permutation drawn from ``seed + e``, and global batch k holds samples
[k G, (k + 1) G) of the concatenated epochs, split over DP ranks and micro-batches exactly as
in pretraining, so every layout sees the same batches.

Evaluation runs the whole dev set each ``--eval-interval`` iterations and at the end. The best
evaluation by ``--best-metric`` is saved under ``--save``/best (older best tags removed);
``--early-stop-patience N`` stops after N evaluations without a lower dev loss.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mtnlg.training import checkpointing
from mtnlg.training.data import stage_loader
from mtnlg.training.forward import forward_only
from mtnlg.training.metrics import MetricsLogger
from mtnlg.training.nonfinite import DEFAULT_MAX_CONSECUTIVE
from mtnlg.training.steps import StepRunner

HIGHER_IS_BETTER = {"val_accuracy": True, "val_f1": True, "val_loss": False}


@dataclass
class Task:
    """What the loop needs of a task."""

    train: list
    batch: Callable[[list], tuple]
    """Examples -> one micro-batch (ids, targets)."""
    evaluate: Callable | None
    """(engine, topo) -> {"val_loss": ..., ...} on the whole dev set; None: no dev set."""
    best_metric: str = "val_loss"


@dataclass
class FinetuneConfig:
    train_iters: int
    micro_batch: int
    global_batch: int
    seq_length: int
    seed: int
    log_interval: int = 10
    eval_interval: int | None = None
    save: str | None = None
    early_stop_patience: int | None = None
    progress_bar: bool = True
    max_consecutive_nonfinite: int = DEFAULT_MAX_CONSECUTIVE


@dataclass
class Outcome:
    iteration: int = 0
    consumed_samples: int = 0
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    """(iteration, metrics) of every evaluation."""
    best: dict | None = None
    """{"iteration", "metric", "value", "tag"} of the best evaluation saved."""
    stopped_early: bool = False


class EpochOrder:
    """Global sample index -> example index: a fresh permutation of the examples per epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def __getitem__(self, sample: int) -> int:
        epoch, pos = divmod(sample, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.n)}
        return int(self._perms[epoch][pos])


class TaskSamples:
    """The task's examples as pretraining's step loader reads a dataset: global sample index ->
    example (``EpochOrder``), and ``micro_batch(sample ids)`` -> ``task.batch`` of those
    examples. ``mtnlg.training.data.rank_micro_batches`` then splits each global batch over DP
    ranks and micro-batches exactly as in pretraining."""

    def __init__(self, task: Task, order: EpochOrder):
        self.task, self.order = task, order

    def micro_batch(self, sample_ids) -> tuple:
        return self.task.batch([self.task.train[self.order[i]] for i in sample_ids])


def eval_outputs(engine, topo, batches: list, compute_loss: bool) -> list | None:
    """Forward-only over this rank's micro-batches: per micro-batch the model's output (no
    targets: classification logits) or loss; None on ranks that do not hold the output."""
    return forward_only(engine, topo, batches, compute_loss=compute_loss)


def share_rows(rows: torch.Tensor, have: bool, device) -> torch.Tensor:
    """Every rank gets the sum of the ``rows`` of the ranks with ``have``: callers place their
    values at their own rows and zeros elsewhere, one contributor per row, so it is exact."""
    out = (rows if have else torch.zeros_like(rows)).to(device)
    dist.all_reduce(out)
    return out.cpu()


def dev_slices(n: int, micro: int, topo) -> tuple[int, list[int]]:
    """(padded size, first sample of each of this rank's micro-batches) for a dev set of n."""
    per = micro * topo.dp
    padded = math.ceil(n / per) * per
    return padded, [(g * topo.dp + topo.dp_rank) * micro for g in range(padded // per)]


def finetune(
    engine,
    topo,
    task: Task,
    cfg: FinetuneConfig,
    schedule,
    meta: dict,
    tokenizer=None,
    logger: MetricsLogger | None = None,
) -> Outcome:
    """Train ``cfg.train_iters`` iterations (or until early stopping); returns the outcome."""
    rank0 = topo.rank == 0
    out = Outcome()
    order = EpochOrder(len(task.train), cfg.seed)
    runner = StepRunner(engine, topo, total=cfg.train_iters, desc="finetune",
                        progress_bar=cfg.progress_bar,
                        max_consecutive_nonfinite=cfg.max_consecutive_nonfinite)  # fmt: skip
    say = runner.say
    best_loss, stale = math.inf, 0

    def save(root: str) -> str:
        progress = {
            "iteration": out.iteration,
            "consumed_samples": out.consumed_samples,
            "consumed_tokens": out.consumed_samples * cfg.seq_length,
        }
        return checkpointing.save(
            engine, topo, root, out.iteration, {**meta, "progress": progress}, tokenizer
        )

    # data on the first and last pipeline stages only, one step ahead (pretraining's loader)
    samples = TaskSamples(task, order)
    with stage_loader(samples, cfg.micro_batch, topo, engine.device) as loader:
        while out.iteration < cfg.train_iters:
            lr = schedule.lr_at(out.iteration, out.consumed_samples * cfg.seq_length)
            micro = loader.get(out.consumed_samples, cfg.global_batch)  # middle stages: None
            if out.iteration + 1 < cfg.train_iters:  # the next step, built while this one runs
                loader.prefetch(out.consumed_samples + cfg.global_batch, cfg.global_batch)
            runner.step(out.iteration + 1, lr, cfg.global_batch, micro)
            out.iteration += 1
            out.consumed_samples += cfg.global_batch
            last = out.iteration == cfg.train_iters
            if runner.log_due(out.iteration, cfg.log_interval, last):
                fields = {
                    "consumed_samples": out.consumed_samples,
                    "epoch": out.consumed_samples / len(task.train),
                    "loss": runner.read(out.losses),
                    "lr": lr,
                    "grad_norm": runner.engine_fields()["grad_norm"],
                    "global_batch": cfg.global_batch,
                }
                runner.log(out.iteration, fields, logger)
            runner.stop_if_due(out.iteration)  # N in a row: exit non-zero, no save
            if task.evaluate is None or not cfg.eval_interval:
                continue
            if out.iteration % cfg.eval_interval and not last:
                continue
            metrics = task.evaluate(engine, topo)
            out.evals.append((out.iteration, metrics))
            say(f"validation at iteration {out.iteration} | " + _format_metrics(metrics))
            if logger is not None:
                logger.log_eval(out.iteration, metrics)
            value = metrics[task.best_metric]
            if out.best is None or _better(task.best_metric, value, out.best["value"]):
                tag = save(str(Path(cfg.save) / "best")) if cfg.save else None
                if tag and rank0:
                    _drop_other_tags(Path(cfg.save) / "best", tag)
                out.best = {
                    "iteration": out.iteration,
                    "metric": task.best_metric,
                    "value": value,
                    "tag": tag,
                }
            if metrics["val_loss"] < best_loss:
                best_loss, stale = metrics["val_loss"], 0
            else:
                stale += 1
            if cfg.early_stop_patience and stale >= cfg.early_stop_patience and not last:
                say(
                    f"early stop at iteration {out.iteration}: dev loss has not improved for "
                    f"{stale} evaluations (best {best_loss:.4f})"
                )
                out.stopped_early = True
                break
    if cfg.save:
        save(cfg.save)
    runner.close(out.losses)
    return out


def _format_metrics(metrics: dict) -> str:
    return " | ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in metrics.items())


def _better(metric: str, value: float, best: float) -> bool:
    return value > best if HIGHER_IS_BETTER.get(metric, False) else value < best


def _drop_other_tags(root: Path, keep: str) -> None:
    """Rank 0, after the save's final barrier: older best checkpoints are removed."""
    for d in root.glob("iter_*"):
        if d.is_dir() and d.name != keep:
            shutil.rmtree(d, ignore_errors=True)
