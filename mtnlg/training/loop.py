"""The pretraining loop: steps, ramp-up, schedule, logging, evaluation, checkpoints.

The hot path does not wait on the device: each step's loss stays a device tensor
(:class:`LossWindow`) until the ``--log-interval`` step reads the whole window back at once, and
the next step's micro-batches are built on a background thread while the current step runs
(``mtnlg.training.data.StepLoader``, first and last pipeline stages only).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mtnlg.planning import iteration_flops
from mtnlg.training import checkpointing
from mtnlg.training.data import StepLoader, stage_loader
from mtnlg.training.metrics import (
    MetricsLogger,
    achieved_tflops,
    format_log_line,
    mfu,
)
from mtnlg.training.nonfinite import DEFAULT_MAX_CONSECUTIVE, NonFiniteGuard
from mtnlg.training.schedules import BatchRampup, LRSchedule
from mtnlg.training.signals import ExitSignalHandler


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


def _is_pipe(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def to_device(targets, device):
    """A tensor, or a tuple of tensors (e.g. labels and a loss mask), moved to ``device``: what
    the pipeline engine does with a labels tuple, for the plain engine."""
    if isinstance(targets, (tuple, list)):
        return tuple(t.to(device) for t in targets)
    return targets.to(device)


class LossWindow:
    """Per-step losses held as device tensors until a log interval reads them back: one
    device-to-host transfer per window instead of one per step."""

    def __init__(self) -> None:
        self._held: list[tuple[int, torch.Tensor]] = []

    def add(self, iteration: int, loss: torch.Tensor) -> None:
        self._held.append((iteration, loss))

    def read(self) -> list[tuple[int, float]]:
        """(iteration, loss) of every step added since the last read, as Python floats."""
        if not self._held:
            return []
        values = torch.stack([t.reshape(()).float() for _, t in self._held]).tolist()
        out = [(it, v) for (it, _), v in zip(self._held, values)]
        self._held = []
        return out


def step_loss(engine, topo, micro_batches) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; the DP-mean loss as a 0-dim fp32
    tensor on the device (nothing waits for it: read it through :class:`LossWindow`)."""
    if _is_pipe(engine):
        return engine.train_batch(data_iter=iter(micro_batches)).detach().float()
    total = torch.zeros((), dtype=torch.float32, device=engine.device)
    for ids, labels in micro_batches:
        loss = engine(ids.to(engine.device), to_device(labels, engine.device))
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    total /= len(micro_batches)
    if topo.dp > 1:
        dist.all_reduce(total, group=topo.dp_group)
        total /= topo.dp
    return total


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
    """DP-mean loss of one global batch, a 0-dim fp32 device tensor."""
    if _is_pipe(engine):  # during ramp-up the engine's accumulation count is smaller
        loss = engine.eval_batch(data_iter=iter(micro), num_micro_batches=len(micro))
        return loss.float().reshape(())  # (1,) on the stages the loss is broadcast to
    engine.eval()
    total = torch.zeros((), dtype=torch.float32, device=engine.device)
    for ids, labels in micro:
        total += engine(ids.to(engine.device), to_device(labels, engine.device)).float()
    engine.train()
    total /= len(micro)
    if topo.dp > 1:
        dist.all_reduce(total, group=topo.dp_group)
        total /= topo.dp
    return total


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)


def _loss_scale(engine) -> float | None:
    opt = engine.optimizer
    scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
    return float(scale) if isinstance(scale, (int, float, torch.Tensor)) else None


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
    eval_tasks: list | None = None,
    exit_signal: ExitSignalHandler | None = None,
) -> Progress:
    """Run until ``loop.train_iters`` (or ``exit_interval``); returns the final progress.

    ``eval_tasks``: prepared zero-shot tasks (``mtnlg.evaluation.tasks``) run at every
    ``eval_interval`` and logged as ``"tasks"`` records. ``exit_signal``
    (``--exit-signal-handler``): once any rank has received the signal, every rank leaves the
    loop after the same iteration and the checkpoint below is saved."""
    train_ds, valid_ds, _ = datasets
    rank0 = topo.rank == 0
    bar = None
    if rank0 and loop.progress_bar:
        from tqdm import tqdm

        bar = tqdm(
            total=loop.train_iters,
            initial=progress.iteration,
            desc="train",
            unit="it",
            dynamic_ncols=True,
        )
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

    losses = LossWindow()
    say = bar.write if bar is not None else print
    nonfinite = NonFiniteGuard(
        engine, topo.rank, dist.get_world_size(), loop.max_consecutive_nonfinite, say
    )
    loader = stage_loader(train_ds, loop.micro_batch, topo, engine.device)
    signalled = False
    try:
        while progress.iteration < loop.train_iters:
            gb = ramp.global_batch_at(progress.consumed_samples)
            if gb != engine.train_batch_size():
                engine.set_train_batch_size(gb)
            lr = schedule.lr_at(progress.iteration, progress.consumed_tokens)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            micro = loader.get(progress.consumed_samples, gb)
            _prefetch_next(loader, loop, ramp, progress, gb)
            with nonfinite.step(progress.iteration + 1):  # skipped if non-finite anywhere
                losses.add(progress.iteration + 1, step_loss(engine, topo, micro))
            progress.iteration += 1
            progress.consumed_samples += gb
            progress.consumed_tokens += gb * loop.seq_length
            window_tokens += gb * loop.seq_length
            # model FLOPs of this architecture (GQA, SwiGLU, untied head); Megatron's
            # 72 B s l h^2 (1 + s/6h + V/12lh) for the GPT shape
            window_flops += iteration_flops(model_cfg, gb, recompute=False, tp=topo.tp)
            if bar is not None:
                bar.update(1)
            last = progress.iteration == loop.train_iters
            if progress.iteration % loop.log_interval == 0 or last or nonfinite.stopping:
                progress.losses.extend(losses.read())  # the window's one host sync
                loss = progress.losses[-1][1]
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}")
                dt = time.perf_counter() - window_t
                tflops = achieved_tflops(window_flops, dt, dist.get_world_size())
                fields = {
                    "consumed_samples": progress.consumed_samples,
                    "consumed_tokens": progress.consumed_tokens,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": _grad_norm(engine),
                    "loss_scale": _loss_scale(engine),
                    "skipped_iters": engine.skipped_steps,
                    "global_batch": gb,
                    "tokens_per_sec": window_tokens / dt,
                    "tflops_per_gpu": tflops,
                }
                if peak_tflops is not None:
                    fields["mfu"] = mfu(tflops, peak_tflops)
                if rank0:
                    line = format_log_line(progress.iteration, loop.train_iters, fields)
                    (bar.write if bar is not None else print)(line)
                if logger is not None:
                    logger.log_train(progress.iteration, fields)
                window_t, window_tokens, window_flops = time.perf_counter(), 0, 0.0
            nonfinite.stop_if_due(progress.iteration)  # N in a row: exit non-zero, no save
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
    progress.losses.extend(losses.read())  # an --exit-interval stop between log intervals
    if loop.save and not (loop.save_interval and progress.iteration % loop.save_interval == 0):
        save()
    if signalled and rank0:
        saved = f"checkpoint saved to {loop.save}" if loop.save else "nothing saved (no --save)"
        say(f"exiting at iteration {progress.iteration} on {exit_signal.sig.name}: {saved}")
    if bar is not None:
        bar.close()
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
    from mtnlg.evaluation.tasks import evaluate_tasks

    fields = evaluate_tasks(engine, topo, tasks, loop.micro_batch)
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
