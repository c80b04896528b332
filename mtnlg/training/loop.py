"""The pretraining loop (also distillation's): ramp-up, schedule, logging, evaluation,
checkpoints, preemption, around the step that fine-tuning shares (``mtnlg.training.steps``).

The hot path does not wait on the device: each step's loss stays a device tensor
(``steps.LossWindow``) until the ``--log-interval`` step reads the whole window back at once,
and the next step's micro-batches are built on a background thread while the current step runs
(``mtnlg.training.data.StepLoader``, first and last pipeline stages only).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mtnlg.planning import iteration_flops
from mtnlg.training import checkpointing
from mtnlg.training.data import StepLoader, stage_loader
from mtnlg.training.forward import forward_only
from mtnlg.training.metrics import MetricsLogger, achieved_tflops, mfu
from mtnlg.training.nonfinite import DEFAULT_MAX_CONSECUTIVE
from mtnlg.training.schedules import BatchRampup, LRSchedule
from mtnlg.training.signals import ExitSignalHandler
from mtnlg.training.steps import LossWindow, StepRunner, step_loss  # noqa: F401 - re-exported


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    losses: list = field(default_factory=list)
    """(iteration, loss) of every step of this process' run (for tests and reports), filled in
    at each log interval and when the loop ends."""


@dataclass
class LoopConfig:
    train_iters: int
    micro_batch: int
    seq_length: int
    log_interval: int = 10
    eval_interval: int | None = None
    eval_iters: int = 10
    save: str | None = None
    save_interval: int | None = None
    keep_last: int | None = None
    exit_interval: int | None = None
    progress_bar: bool = True
    max_consecutive_nonfinite: int = DEFAULT_MAX_CONSECUTIVE


@torch.no_grad()
def eval_loss(engine, topo, dataset, loop: LoopConfig, global_batch: int) -> float:
    """Mean loss over the first ``eval_iters`` global batches of ``dataset`` (read back once)."""
    losses = []
    with stage_loader(dataset, loop.micro_batch, topo, engine.device) as loader:
        for k in range(loop.eval_iters):
            micro = loader.get(k * global_batch, global_batch)
            if k + 1 < loop.eval_iters:
                loader.prefetch((k + 1) * global_batch, global_batch)
            losses.append(_eval_batch(engine, topo, micro))
    losses = torch.stack(losses).tolist()
    return sum(losses) / len(losses)


def _eval_batch(engine, topo, micro) -> torch.Tensor:
    """DP-mean loss of one global batch (the mean of its micro-batch losses, as a training
    step's), a 0-dim fp32 device tensor on every rank."""
    outs = forward_only(engine, topo, micro)  # the last stage's per-micro-batch losses
    total = torch.zeros((), dtype=torch.float32, device=engine.device)
    if outs is not None:
        total += torch.stack([x.float().reshape(()) for x in outs]).mean()
    if topo.pp > 1:  # the last stage's value to every stage
        dist.all_reduce(total, group=topo.pp_group)
    if topo.dp > 1:
        dist.all_reduce(total, group=topo.dp_group)
        total /= topo.dp
    return total


def train(
    engine,
    topo,
    model_cfg,
    datasets,
    loop: LoopConfig,
    schedule: LRSchedule,
    ramp: BatchRampup,
    progress: Progress,
    meta: dict,
    tokenizer=None,
    logger: MetricsLogger | None = None,
    peak_tflops: float | None = None,
    eval_tasks: Callable[[object, object], dict] | None = None,
    exit_signal: ExitSignalHandler | None = None,
) -> Progress:
    """Run until ``loop.train_iters`` (or ``exit_interval``); returns the final progress.

    ``eval_tasks``: a hook ``(engine, topo) -> log fields`` run at every ``eval_interval`` and
    logged as ``"tasks"`` records (the entry wires it: ``mtnlg.evaluation.tasks``). ``exit_signal``
    (``--exit-signal-handler``): once any rank has received the signal, every rank leaves the
    loop after the same iteration and the checkpoint below is saved."""
    train_ds, valid_ds, _ = datasets
    rank0 = topo.rank == 0
    runner = StepRunner(engine, topo, total=loop.train_iters, initial=progress.iteration,
                        progress_bar=loop.progress_bar,
                        max_consecutive_nonfinite=loop.max_consecutive_nonfinite)  # fmt: skip
    bar, say = runner.bar, runner.say
    window_t, window_tokens, window_flops = time.perf_counter(), 0, 0.0

    def save() -> None:
        if loop.save:
            checkpointing.save(
                engine,
                topo,
                loop.save,
                progress.iteration,
                {**meta, "progress": _progress_dict(progress)},
                tokenizer,
                keep_last=loop.keep_last,
            )

    loader = stage_loader(train_ds, loop.micro_batch, topo, engine.device)
    signalled = False
    try:
        while progress.iteration < loop.train_iters:
            gb = ramp.global_batch_at(progress.consumed_samples)
            lr = schedule.lr_at(progress.iteration, progress.consumed_tokens)
            micro = loader.get(progress.consumed_samples, gb)
            _prefetch_next(loader, loop, ramp, progress, gb)
            runner.step(progress.iteration + 1, lr, gb, micro)
            progress.iteration += 1
            progress.consumed_samples += gb
            progress.consumed_tokens += gb * loop.seq_length
            window_tokens += gb * loop.seq_length
            # model FLOPs of this architecture (GQA, SwiGLU, untied head); Megatron's
            # 72 B s l h^2 (1 + s/6h + V/12lh) for the GPT shape
            window_flops += iteration_flops(model_cfg, gb, recompute=False, tp=topo.tp)
            last = progress.iteration == loop.train_iters
            if runner.log_due(progress.iteration, loop.log_interval, last):
                loss = runner.read(progress.losses)
                dt = time.perf_counter() - window_t
                tflops = achieved_tflops(window_flops, dt, dist.get_world_size())
                fields = {
                    "consumed_samples": progress.consumed_samples,
                    "consumed_tokens": progress.consumed_tokens,
                    "loss": loss,
                    "lr": lr,
                    **runner.engine_fields(),
                    "global_batch": gb,
                    "tokens_per_sec": window_tokens / dt,
                    "tflops_per_gpu": tflops,
                }
                if peak_tflops is not None:
                    fields["mfu"] = mfu(tflops, peak_tflops)
                runner.log(progress.iteration, fields, logger)
                window_t, window_tokens, window_flops = time.perf_counter(), 0, 0.0
            runner.stop_if_due(progress.iteration)  # N in a row: exit non-zero, no save
            if valid_ds is not None and _eval_due(loop, progress.iteration):
                _run_eval(engine, topo, valid_ds, loop, ramp, progress, logger, bar)
            if eval_tasks and _eval_due(loop, progress.iteration):
                _run_eval_tasks(engine, topo, eval_tasks, loop, progress, logger, bar)
            if loop.save_interval and progress.iteration % loop.save_interval == 0:
                save()
            if exit_signal is not None and exit_signal.should_exit(engine.device):
                signalled = True  # one tiny all-reduce per iteration, only with the flag
                break
            if loop.exit_interval and progress.iteration >= loop.exit_interval:
                break
    finally:
        loader.close()
    if loop.save and not (loop.save_interval and progress.iteration % loop.save_interval == 0):
        save()
    if signalled and rank0:
        saved = f"checkpoint saved to {loop.save}" if loop.save else "nothing saved (no --save)"
        say(f"exiting at iteration {progress.iteration} on {exit_signal.sig.name}: {saved}")
    runner.close(progress.losses)
    return progress


def _prefetch_next(loader: StepLoader, loop, ramp, progress: Progress, gb: int) -> None:
    """Start building the next step's micro-batches, unless this step is the last one."""
    stop = loop.exit_interval or loop.train_iters
    if progress.iteration + 1 < min(loop.train_iters, stop):
        start = progress.consumed_samples + gb
        loader.prefetch(start, ramp.global_batch_at(start))


def _run_eval(engine, topo, valid_ds, loop, ramp, progress, logger, bar) -> None:
    vl = eval_loss(engine, topo, valid_ds, loop, ramp.global_batch_size)
    fields = {
        "val_loss": vl,
        "val_ppl": math.exp(min(vl, 50.0)),
        "consumed_tokens": progress.consumed_tokens,
    }
    if topo.rank == 0:
        msg = (
            f"validation at iteration {progress.iteration} | loss {vl:.4f} | "
            f"perplexity {fields['val_ppl']:.2f}"
        )
        (bar.write if bar is not None else print)(msg)
    if logger is not None:
        logger.log_eval(progress.iteration, fields)


def _eval_due(loop: LoopConfig, iteration: int) -> bool:
    interval = loop.eval_interval
    return bool(interval) and (iteration % interval == 0 or iteration == loop.train_iters)


def _run_eval_tasks(engine, topo, tasks, loop, progress, logger, bar) -> None:
    fields = tasks(engine, topo)
    if topo.rank == 0:
        msg = f"zero-shot tasks at iteration {progress.iteration} | " + " | ".join(
            f"{k} {v:.4f}" for k, v in fields.items()
        )
        (bar.write if bar is not None else print)(msg)
    if logger is not None:
        logger.log_tasks(progress.iteration, fields)


def _progress_dict(p: Progress) -> dict:
    return {
        "iteration": p.iteration,
        "consumed_samples": p.consumed_samples,
        "consumed_tokens": p.consumed_tokens,
    }
