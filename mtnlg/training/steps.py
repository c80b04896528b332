"""One optimizer step at a time, the way pretraining, distillation and fine-tuning all take it.

:class:`StepRunner` owns what their loops share: the global batch (ramp-up) and learning rate
set on the engine, the step guarded so that a non-finite loss or gradient on any rank skips it
everywhere (``NonFiniteGuard``), its loss kept on the device until a log interval reads the
window back at once (:class:`LossWindow`), the progress bar and the rank-0 log line. The loops
(``mtnlg.training.loop.train``, ``mtnlg.finetuning.loop.finetune``) keep what differs: data
order, evaluation, checkpoints, early stopping, preemption.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtnlg.training.forward import is_pipe, to_device
from mtnlg.training.metrics import MetricsLogger, format_log_line
from mtnlg.training.nonfinite import NonFiniteGuard


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
    if is_pipe(engine):
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


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)


def _loss_scale(engine) -> float | None:
    opt = engine.optimizer
    scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
    return float(scale) if isinstance(scale, (int, float, torch.Tensor)) else None


class StepRunner:
    """Steps on ``engine``; ``total`` iterations for the bar (starting at ``initial``)."""

    def __init__(
        self, engine, topo, *, total: int, initial: int = 0, desc: str = "train",
        progress_bar: bool = True, max_consecutive_nonfinite: int,
    ) -> None:  # fmt: skip
        self.engine, self.topo, self.total = engine, topo, total
        rank0 = topo.rank == 0
        self.bar = None
        if rank0 and progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True)
        self.say = (self.bar.write if self.bar is not None else print) if rank0 else _silent
        """Print on rank 0 without breaking the bar; nothing elsewhere."""
        self.window = LossWindow()
        world = dist.get_world_size()
        self.nonfinite = NonFiniteGuard(engine, topo.rank, world, max_consecutive_nonfinite,
                                        self.say)  # fmt: skip

    def step(self, iteration: int, lr: float, global_batch: int, micro) -> None:
        """Optimizer step ``iteration`` (1-based) over this rank's micro-batches ``micro``."""
        engine = self.engine
        if global_batch != engine.train_batch_size():  # batch ramp-up
            engine.set_train_batch_size(global_batch)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        with self.nonfinite.step(iteration):  # skipped on every rank if non-finite on any
            self.window.add(iteration, step_loss(engine, self.topo, micro))
        if self.bar is not None:
            self.bar.update(1)

    def log_due(self, iteration: int, interval: int, last: bool) -> bool:
        return iteration % interval == 0 or last or self.nonfinite.stopping

    def read(self, losses: list) -> float:
        """Append the window's (iteration, loss) to ``losses`` (one host sync); the last loss."""
        losses.extend(self.window.read())
        loss = losses[-1][1]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")
        return loss

    def engine_fields(self) -> dict:
        """What the engine knows of the last step: gradient norm, loss scale, skipped steps."""
        return {
            "grad_norm": _grad_norm(self.engine),
            "loss_scale": _loss_scale(self.engine),
            "skipped_iters": self.engine.skipped_steps,
        }

    def log(self, iteration: int, fields: dict, logger: MetricsLogger | None) -> None:
        """The rank-0 log line and the metrics record (JSON Lines, TensorBoard)."""
        self.say(format_log_line(iteration, self.total, fields))
        if logger is not None:
            logger.log_train(iteration, fields)

    def stop_if_due(self, iteration: int) -> None:
        """``--max-consecutive-nonfinite`` in a row: every rank exits non-zero, no save."""
        self.nonfinite.stop_if_due(iteration)

    def close(self, losses: list) -> None:
        """The losses of a stop between log intervals (``--exit-interval``, early stopping,
        preemption) appended to ``losses``, then the bar closed."""
        losses.extend(self.window.read())
        if self.bar is not None:
            self.bar.close()


def _silent(_msg: str) -> None:
    pass
