"""Steps whose loss or gradients are non-finite: the update is skipped, counted, logged, and the
run stops after ``--max-consecutive-nonfinite`` of them in a row.

DeepSpeed 0.19.8 already checks the gradients, on every rank, for most optimizer wrappers it
builds (``engine.optimizer``); a wrapper that finds a non-finite global gradient norm (or an
inf/NaN gradient) sets ``optimizer.overflow``, leaves the master weights and the optimizer state
untouched, clears the gradients, and the engine counts ``engine.skipped_steps``:

================================  ==========================  ===================================
precision / ZeRO                  ``engine.optimizer``        non-finite gradients
================================  ==========================  ===================================
fp32, ZeRO 1/2                    ``DeepSpeedZeroOptimizer``  skipped (norm is inf/NaN)
bf16, ZeRO 1 (fp32 accumulation)  ``BF16_Optimizer``          skipped (norm is inf/NaN)
bf16, ZeRO 2                      ``DeepSpeedZeroOptimizer``  skipped (``check_grad_overflow``)
bf16, ZeRO 0 (PP > 1)             ``BF16_Optimizer``          skipped
bf16, ZeRO 0 (PP = 1)             ``FP16_UnfusedOptimizer``   skipped (per-tensor inf/NaN check)
fp32 / bf16, ZeRO 3               ``..._Stage3``              skipped (norm is inf/NaN)
fp16 (any ZeRO)                   loss-scaling wrappers       skipped, loss scale halved
fp32, ZeRO 0                      the torch optimizer itself  **applied: weights become NaN**
================================  ==========================  ===================================

:func:`check_unwrapped_optimizer` gives the last row the same behaviour (a global gradient norm,
the ``overflow`` flag the engine already reads), so ``engine.skipped_steps`` is right on every
path. :class:`NonFiniteGuard` watches ``engine.skipped_steps`` around each step (a host integer:
no device read), prints a rank-0 line per skipped step and stops the run after too many in a row.
Every rank takes the same decision: the checks above reduce over the data- and model-parallel
groups before anyone decides, so all ranks stop at the same iteration.

A non-finite loss makes every gradient behind it non-finite (backward multiplies by it), so the
gradient check also catches it; the loss itself is not read per step (``LossWindow``).

fp16: an overflow while DeepSpeed's dynamic loss scale can still be lowered is loss scaling
doing its job; it is counted in ``skipped_iters`` but not toward the stop. Once the scale is at
its minimum (or is static) an overflow counts like any other non-finite step.

Test hook: ``MTNLG_TEST_POISON_ITERS="5,6"`` multiplies the model's output by NaN in the
training forward passes of those iterations on one global rank only
(``MTNLG_TEST_POISON_RANK``, default the last rank), so the detection has to be global.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

POISON_ITERS_ENV = "MTNLG_TEST_POISON_ITERS"
POISON_RANK_ENV = "MTNLG_TEST_POISON_RANK"
DEFAULT_MAX_CONSECUTIVE = 10
"""A skipped step leaves the weights unchanged, so a NaN the weights cause repeats on every
step while a bad batch does not: a few steps in a row tell the two apart. 10 costs ~10 min at
530B scale (~60 s per iteration) before the job stops."""


class NonFiniteStop(SystemExit):
    """Too many consecutive non-finite steps: non-zero exit on every rank, nothing saved."""


def non_negative_int(text: str) -> int:
    """argparse ``type`` for ``--max-consecutive-nonfinite`` (0 disables the stop)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 0 (0: never stop)")
    return value


def check_unwrapped_optimizer(engine) -> bool:
    """Skip the update of DeepSpeed's unwrapped (fp32, no ZeRO) optimizer on non-finite grads.

    The engine calls ``optimizer.step()`` after reducing the gradients over data parallelism
    and reads ``optimizer.overflow`` afterwards (``_take_model_step``) to count a skipped step;
    the plain torch optimizer has no such flag. Its ``step`` is wrapped: the global gradient
    norm (DeepSpeed's ``get_global_norm_of_tensors``: a sum over the model-parallel group, the
    data-parallel ranks already hold the reduced gradients) decides, one scalar all-reduce and
    one host read per step. Returns False where DeepSpeed's wrapper already checks.
    """
    from deepspeed.runtime.utils import get_global_norm_of_tensors, is_invalid_grad_norm

    opt = engine.optimizer
    if opt is None or hasattr(opt, "overflow"):
        return False
    step, mpu, device = opt.step, engine.mpu, engine.device

    def step_if_finite(closure=None):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = get_global_norm_of_tensors(grads or [torch.zeros((), device=device)], mpu=mpu)
        opt.overflow = is_invalid_grad_norm(norm)  # -1 marks inf/NaN; the host read
        return None if opt.overflow else step(closure)

    opt.overflow = False
    opt.step = step_if_finite
    return True


def _scale_can_drop(optimizer) -> bool:
    """True while a dynamic fp16 loss scale is above its minimum (an overflow then only lowers
    it). DeepSpeed keeps it in ``loss_scaler`` (ZeRO) or ``loss_scale_config`` (FP16_*)."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None and getattr(scaler, "dynamic", False):
        return float(scaler.cur_scale) > float(scaler.min_scale)
    cfg = getattr(optimizer, "loss_scale_config", None)
    if cfg is not None and getattr(cfg, "dynamic_loss_scale", False):
        return float(cfg.cur_scale) > float(cfg.min_loss_scale)
    return False


def _times_nan(output):
    """``output`` (a tensor, or a tuple whose first floating tensor is poisoned) times NaN."""
    if isinstance(output, torch.Tensor):
        return output * float("nan") if output.is_floating_point() else output
    if isinstance(output, (tuple, list)):
        out = list(output)
        for i, t in enumerate(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                out[i] = t * float("nan")
                return type(output)(out)
    return output


def poison_iterations(rank: int, world_size: int) -> set[int]:
    """The iterations ``MTNLG_TEST_POISON_ITERS`` poisons on this rank (empty: no hook)."""
    text = os.environ.get(POISON_ITERS_ENV, "").strip()
    if not text:
        return set()
    try:
        iters = {int(x) for x in text.split(",") if x.strip()}
        target = int(os.environ.get(POISON_RANK_ENV, world_size - 1))
    except ValueError:
        raise ValueError(
            f"{POISON_ITERS_ENV}={text!r} / {POISON_RANK_ENV}: comma-separated integers expected"
        ) from None
    return iters if rank == target else set()


class NonFiniteGuard:
    """Counts skipped steps around each training step and stops after too many in a row.

    Use as ``with guard.step(iteration): <one optimizer step>``, then, after the step was
    logged, ``guard.stop_if_due(iteration)``; ``guard.stopping`` says the stop is due (log now).
    ``max_consecutive`` 0 never stops (DeepSpeed's behaviour: skip forever).
    """

    def __init__(self, engine, rank: int, world_size: int, max_consecutive: int, say=print):
        self.engine, self.max_consecutive = engine, max_consecutive
        self.say: Callable[[str], None] | None = say if rank == 0 else None
        self.consecutive = 0
        self.first_of_run: int | None = None
        self.stopping = False
        check_unwrapped_optimizer(engine)
        self._poison = poison_iterations(rank, world_size)
        self._iteration: int | None = None
        if self._poison:
            engine.module.register_forward_hook(self._poison_hook)

    def _poison_hook(self, module, inputs, output):
        if module.training and self._iteration in self._poison:
            return _times_nan(output)
        return None

    @contextmanager
    def step(self, iteration: int) -> Iterator[None]:
        """Around the optimizer step of ``iteration`` (1-based, the number it is logged as)."""
        skipped, can_drop = self.engine.skipped_steps, _scale_can_drop(self.engine.optimizer)
        self._iteration = iteration
        try:
            yield
        finally:
            self._iteration = None
        if self.engine.skipped_steps == skipped:
            self.consecutive = 0
            return
        total = self.engine.skipped_steps
        if can_drop:  # fp16 loss scaling at work: DeepSpeed logs the new scale itself
            self._say(f"iteration {iteration}: fp16 overflow, update skipped ({total} in total)")
            return
        self.consecutive += 1
        if self.consecutive == 1:
            self.first_of_run = iteration
        self._say(
            f"iteration {iteration}: non-finite loss or gradients on some rank, update skipped "
            f"({self.consecutive} in a row, {total} skipped in total)"
        )
        self.stopping = 0 < self.max_consecutive <= self.consecutive

    def stop_if_due(self, iteration: int) -> None:
        """Raise :class:`NonFiniteStop` (message on rank 0) once the stop is due."""
        if not self.stopping:
            return
        if self.say is None:
            raise NonFiniteStop(1)
        raise NonFiniteStop(
            f"error: stopping at iteration {iteration}: the loss or gradients were non-finite "
            f"for {self.consecutive} consecutive iterations ({self.first_of_run}-{iteration}; "
            f"--max-consecutive-nonfinite {self.max_consecutive}); the updates were skipped and "
            "nothing was saved: resume from the last checkpoint (e.g. with a lower --lr or "
            "other data)"
        )

    def _say(self, msg: str) -> None:
        if self.say is not None:
            self.say(msg)
