"""Learning-rate schedule and global-batch-size ramp-up, with Megatron-LM's semantics.

Both are pure functions of training progress (iteration, consumed samples / tokens), so a resumed
run recomputes them from the counters saved in the checkpoint; ``LRSchedule.state_dict`` only
records the configuration so that a resume with different flags is noticed
(``mtnlg.training.resume``).

The MT-NLG 530B recipe (Smith et al. 2022, section 3.2) is ``mtnlg_recipe()``: batch 32 -> 1920
in steps of 32 over the first 12B tokens, lr 5e-5 with a 1B-token linear warmup, then cosine
decay to 10% of it over 340B tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass
class LRSchedule:
    """Linear warmup from 0 to ``lr``, then decay to ``min_lr``; counted in iterations or tokens.

    Tokens mode is chosen by setting ``warmup_tokens`` / ``decay_tokens`` (Megatron-DeepSpeed's
    ``--lr-warmup-tokens`` / ``--lr-decay-tokens``, as MT-NLG used); the iteration fields must
    then keep their defaults.
    """

    lr: float
    """Peak learning rate reached at the end of warmup (``--lr``)."""
    min_lr: float = 0.0
    """Floor reached at the end of decay and kept afterwards (``--min-lr``)."""
    decay_style: str = "cosine"
    """``constant`` (stay at ``lr``), ``linear`` or ``cosine`` (``--lr-decay-style``)."""
    warmup_iters: int = 0
    """Iterations of linear warmup, counted from iteration 0 (``--lr-warmup-iters``)."""
    decay_iters: int | None = None
    """Iteration at which decay ends (``--lr-decay-iters``); needed unless constant or tokens."""
    warmup_tokens: int | None = None
    """Tokens of linear warmup (``--lr-warmup-tokens``); selects tokens mode."""
    decay_tokens: int | None = None
    """Token count at which decay ends (``--lr-decay-tokens``); selects tokens mode."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr ({self.min_lr}) must be in [0, --lr ({self.lr})]")
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(
                f"--lr-decay-style {self.decay_style!r} is unknown; choose one of {DECAY_STYLES}"
            )
        if self.tokens_mode:
            if self.warmup_iters != 0 or self.decay_iters is not None:
                raise ValueError(
                    "--lr-warmup-iters / --lr-decay-iters cannot be combined with "
                    "--lr-warmup-tokens / --lr-decay-tokens: count the schedule in one unit"
                )
            warmup, decay, unit = self.warmup_tokens or 0, self.decay_tokens, "tokens"
        else:
            warmup, decay, unit = self.warmup_iters, self.decay_iters, "iters"
        if warmup < 0:
            raise ValueError(f"--lr-warmup-{unit} must be >= 0, got {warmup}")
        if decay is None:
            if self.decay_style != "constant":
                raise ValueError(
                    f"--lr-decay-{unit} is required with --lr-decay-style {self.decay_style}"
                )
        elif decay < warmup:
            raise ValueError(
                f"--lr-decay-{unit} ({decay}) must be >= --lr-warmup-{unit} ({warmup})"
            )

    @property
    def tokens_mode(self) -> bool:
        """True when warmup and decay are measured in consumed tokens."""
        return self.warmup_tokens is not None or self.decay_tokens is not None

    def lr_at(self, iteration: int, consumed_tokens: int) -> float:
        """Learning rate for the step taken at ``iteration`` after ``consumed_tokens`` tokens.

        Megatron's ``OptimizerParamScheduler.get_lr``: ``lr * x / warmup`` while
        ``x <= warmup`` (so step 0 has lr 0), then decay with progress
        ``(x - warmup) / (decay - warmup)``, and ``min_lr`` once ``x > decay``.
        """
        if self.tokens_mode:
            x, warmup, decay = consumed_tokens, self.warmup_tokens or 0, self.decay_tokens
        else:
            x, warmup, decay = iteration, self.warmup_iters, self.decay_iters
        if warmup > 0 and x <= warmup:
            return self.lr * x / warmup
        if self.decay_style == "constant":
            return self.lr
        if x >= decay:
            return self.min_lr
        progress = (x - warmup) / (decay - warmup)
        if self.decay_style == "linear":
            coeff = 1.0 - progress
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.lr - self.min_lr) * coeff

    def state_dict(self) -> dict:
        """The configuration, saved with a checkpoint (the progress lives in its counters)."""
        return dataclasses.asdict(self)

    def load_state_dict(
        self, state: dict, override: bool = False, use_checkpoint: bool = False
    ) -> None:
        """Reconcile this (the command line's) schedule with a checkpoint's, as Megatron's
        ``OptimizerParamScheduler.load_state_dict`` does.

        ``override`` (``--override-opt_param-scheduler``): this schedule is kept.
        ``use_checkpoint`` (``--use-checkpoint-opt_param-scheduler``): the checkpoint's
        schedule replaces this one's fields. Neither: a difference is a ValueError naming each
        field with both values.
        """
        if override and use_checkpoint:
            raise ValueError(
                "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                "contradict: give one"
            )
        saved = LRSchedule.from_state_dict(state)
        if override:
            return
        if use_checkpoint:
            for f in dataclasses.fields(self):
                setattr(self, f.name, getattr(saved, f.name))
            return
        diffs = [
            f"{f.name}: checkpoint {getattr(saved, f.name)!r}, now {getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(saved, f.name) != getattr(self, f.name)
        ]
        if diffs:
            raise ValueError(
                "the checkpoint was trained with a different LR schedule ("
                + "; ".join(diffs)
                + "); pass --override-opt_param-scheduler to use the new one or "
                "--use-checkpoint-opt_param-scheduler to keep the checkpoint's"
            )

    @classmethod
    def from_state_dict(cls, state: dict) -> LRSchedule:
        """Rebuild the schedule saved by ``state_dict``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(state) - names
        if unknown:
            raise ValueError(f"unknown LR schedule keys in checkpoint: {sorted(unknown)}")
        return cls(**state)


@dataclass
class BatchRampup:
    """Global batch size as a function of consumed samples (``--rampup-batch-size``).

    The batch starts at ``start_batch_size`` and grows by ``batch_size_increment`` every
    ``ramp_samples / num_increments`` samples, reaching ``global_batch_size`` after
    ``ramp_samples``. Without a ramp (``start_batch_size=None``) it is constant.
    """

    global_batch_size: int
    """Final global batch size in samples (``--global-batch-size``)."""
    start_batch_size: int | None = None
    """START of ``--rampup-batch-size``; None means no ramp (constant batch)."""
    batch_size_increment: int = 1
    """INCREMENT of ``--rampup-batch-size``."""
    ramp_samples: int = 0
    """RAMP_SAMPLES of ``--rampup-batch-size``: samples over which the batch ramps."""

    def __post_init__(self) -> None:
        if self.global_batch_size < 1:
            raise ValueError(f"--global-batch-size must be >= 1, got {self.global_batch_size}")
        if self.start_batch_size is None:
            self.start_batch_size = self.global_batch_size
        start, inc, final = self.start_batch_size, self.batch_size_increment, self.global_batch_size
        if not 1 <= start <= final:
            raise ValueError(
                f"--rampup-batch-size START ({start}) must be in [1, --global-batch-size ({final})]"
            )
        if inc < 1 or self.ramp_samples < 0:
            raise ValueError(
                f"--rampup-batch-size INCREMENT ({inc}) must be >= 1 and "
                f"RAMP_SAMPLES ({self.ramp_samples}) >= 0"
            )
        if (final - start) % inc:
            raise ValueError(
                f"--global-batch-size ({final}) minus --rampup-batch-size START ({start}) "
                f"must be divisible by INCREMENT ({inc})"
            )

    @classmethod
    def from_args(cls, global_batch_size: int, rampup_batch_size: list[int] | None) -> BatchRampup:
        """From ``--global-batch-size`` and the three ints of ``--rampup-batch-size`` (or None)."""
        if rampup_batch_size is None:
            return cls(global_batch_size)
        if len(rampup_batch_size) != 3:
            raise ValueError("--rampup-batch-size takes three ints: START INCREMENT RAMP_SAMPLES")
        start, inc, samples = (int(v) for v in rampup_batch_size)
        return cls(global_batch_size, start, inc, samples)

    @property
    def num_increments(self) -> int:
        return (self.global_batch_size - self.start_batch_size) // self.batch_size_increment

    def global_batch_at(self, consumed_samples: int) -> int:
        """Batch size of the step taken after ``consumed_samples`` samples.

        ``start + floor(consumed / interval) * increment`` with ``interval = ramp / increments``,
        computed in exact integer arithmetic (Megatron divides in floating point).
        """
        n = self.num_increments
        if n == 0 or self.ramp_samples == 0 or consumed_samples >= self.ramp_samples:
            return self.global_batch_size
        steps = (consumed_samples * n) // self.ramp_samples
        return min(
            self.start_batch_size + steps * self.batch_size_increment, self.global_batch_size
        )

    def check(self, micro_batch_size: int, data_parallel_size: int) -> None:
        """Every batch the ramp visits must split into whole micro-batches on every DP rank."""
        unit = micro_batch_size * data_parallel_size
        if unit < 1:
            raise ValueError("--micro-batch-size and the data-parallel size must be >= 1")
        sizes = [
            self.start_batch_size + k * self.batch_size_increment
            for k in range(self.num_increments + 1)
        ]
        for size in sizes:
            if size % unit:
                flag = "--global-batch-size" if size == sizes[-1] else "--rampup-batch-size"
                raise ValueError(
                    f"{flag}: global batch {size} is not divisible by --micro-batch-size "
                    f"({micro_batch_size}) x data-parallel size ({data_parallel_size}) = {unit}; "
                    "every batch of the ramp (START + k * INCREMENT) must be"
                )

    def num_micro_batches(
        self, consumed_samples: int, micro_batch_size: int, data_parallel_size: int
    ) -> int:
        """Gradient-accumulation steps per DP rank for the step after ``consumed_samples``."""
        return self.global_batch_at(consumed_samples) // (micro_batch_size * data_parallel_size)

    def _ramp_steps(self):
        """Yield (iterations done, samples consumed) through the ramp, until the batch is final."""
        iters, consumed = 0, 0
        while True:
            yield iters, consumed
            batch = self.global_batch_at(consumed)
            if batch == self.global_batch_size:
                return
            iters, consumed = iters + 1, consumed + batch

    def samples_after_iterations(self, iterations: int) -> int:
        """Samples consumed by the first ``iterations`` steps, ramp included."""
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        for iters, consumed in self._ramp_steps():
            if iters == iterations:
                return consumed
        return consumed + (iterations - iters) * self.global_batch_size

    def num_iterations_for_samples(self, train_samples: int) -> int:
        """Most steps whose samples fit in ``train_samples`` (``--train-samples``).

        Like Megatron's ``update_train_iters``, a partial last batch is dropped, so
        ``samples_after_iterations(n) <= train_samples`` for the returned ``n``.
        """
        if train_samples < 0:
            raise ValueError(f"--train-samples must be >= 0, got {train_samples}")
        for iters, consumed in self._ramp_steps():
            if consumed + self.global_batch_at(consumed) > train_samples:
                return iters
        return iters + (train_samples - consumed) // self.global_batch_size


def mtnlg_recipe(seq_length: int = 2048) -> tuple[LRSchedule, BatchRampup]:
    """MT-NLG 530B's schedule: lr 5e-5, 1B-token warmup, cosine to 5e-6 over 340B tokens;
    batch 32 -> 1920 by 32 over 12B tokens (5,859,375 samples of 2048 tokens)."""
    lr = LRSchedule(
        lr=5e-5,
        min_lr=5e-6,
        decay_style="cosine",
        warmup_tokens=1_000_000_000,
        decay_tokens=340_000_000_000,
    )
    ramp = BatchRampup(1920, 32, 32, 12_000_000_000 // seq_length)
    return lr, ramp
