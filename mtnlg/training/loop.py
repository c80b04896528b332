"""The pretraining loop: steps, ramp-up, schedule, logging, evaluation, checkpoints."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mtnlg.training import checkpointing
from mtnlg.training.data import rank_micro_batches
from mtnlg.training.metrics import (
    MetricsLogger,
    achieved_tflops,
    flops_per_iteration,
    format_log_line,
    mfu,
)
from mtnlg.training.schedules import BatchRampup, LRSchedule


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    losses: list = field(default_factory=list)
    """(iteration, loss) of every step of this process' run (for tests and reports)."""


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
    exit_interval: int | None = None
    progress_bar: bool = True


def _is_pipe(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def to_device(targets, device):
    """A tensor, or a tuple of tensors (e.g. labels and a loss mask), moved to ``device``: what
    the pipeline engine does with a labels tuple, for the plain engine."""
    if isinstance(targets, (tuple, list)):
        return tuple(t.to(device) for t in targets)
    return targets.to(device)


def train_step(engine, topo, micro_batches) -> float:
    """One optimizer step over this rank's micro-batches; returns the DP-mean loss."""
    if _is_pipe(engine):
        return float(engine.train_batch(data_iter=iter(micro_batches)))
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
    return float(total)


@torch.no_grad()
def eval_loss(engine, topo, dataset, loop: LoopConfig, global_batch: int) -> float:
    """Mean loss over the first ``eval_iters`` global batches of ``dataset``."""
    losses = []
    for k in range(loop.eval_iters):
        micro = rank_micro_batches(
            dataset, k * global_batch, global_batch, loop.micro_batch, topo.dp, topo.dp_rank
        )
        if _is_pipe(engine):  # during ramp-up the engine's accumulation count is smaller
            loss = engine.eval_batch(data_iter=iter(micro), num_micro_batches=len(micro))
            losses.append(float(loss))
            continue
        engine.eval()
        total = torch.zeros((), dtype=torch.float32, device=engine.device)
        for ids, labels in micro:
            total += engine(ids.to(engine.device), to_device(labels, engine.device)).float()
        engine.train()
        total /= len(micro)
        if topo.dp > 1:
            dist.all_reduce(total, group=topo.dp_group)
            total /= topo.dp
        losses.append(float(total))
    return sum(losses) / len(losses)


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
) -> Progress:
    """Run until ``loop.train_iters`` (or ``exit_interval``); returns the final progress.

    ``eval_tasks``: prepared zero-shot tasks (``mtnlg.evaluation.tasks``) run at every
    ``eval_interval`` and logged as ``"tasks"`` records."""
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
            )

    while progress.iteration < loop.train_iters:
        gb = ramp.global_batch_at(progress.consumed_samples)
        if gb != engine.train_batch_size():
            engine.set_train_batch_size(gb)
        lr = schedule.lr_at(progress.iteration, progress.consumed_tokens)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        micro = rank_micro_batches(
            train_ds, progress.consumed_samples, gb, loop.micro_batch, topo.dp, topo.dp_rank
        )
        loss = train_step(engine, topo, micro)
        progress.iteration += 1
        progress.consumed_samples += gb
        progress.consumed_tokens += gb * loop.seq_length
        progress.losses.append((progress.iteration, loss))
        window_tokens += gb * loop.seq_length
        window_flops += flops_per_iteration(
            gb,
            loop.seq_length,
            model_cfg.num_layers,
            model_cfg.hidden_size,
            model_cfg.padded_vocab_size(topo.tp),
            recompute=False,
        )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        if progress.iteration % loop.log_interval == 0 or progress.iteration == loop.train_iters:
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
        if valid_ds is not None and _eval_due(loop, progress.iteration):
            vl = eval_loss(engine, topo, valid_ds, loop, ramp.global_batch_size)
            fields = {
                "val_loss": vl,
                "val_ppl": math.exp(min(vl, 50.0)),
                "consumed_tokens": progress.consumed_tokens,
            }
            if rank0:
                msg = (
                    f"validation at iteration {progress.iteration} | loss {vl:.4f} | "
                    f"perplexity {fields['val_ppl']:.2f}"
                )
                (bar.write if bar is not None else print)(msg)
            if logger is not None:
                logger.log_eval(progress.iteration, fields)
        if eval_tasks and _eval_due(loop, progress.iteration):
            _run_eval_tasks(engine, topo, eval_tasks, loop, progress, logger, bar)
        if loop.save_interval and progress.iteration % loop.save_interval == 0:
            save()
        if loop.exit_interval and progress.iteration >= loop.exit_interval:
            break
    if loop.save and not (loop.save_interval and progress.iteration % loop.save_interval == 0):
        save()
    if bar is not None:
        bar.close()
    return progress


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
