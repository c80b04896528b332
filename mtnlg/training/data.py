"""Training data for one rank: datasets from flags, and this rank's micro-batches per step
(built one step ahead, only on the pipeline stages that load data: :class:`StepLoader`).

Sample order is a pure function of (data, split, seed, seq_length, sample counts), and the
global batch of step k is samples [consumed, consumed + G): resuming at a consumed-sample count
continues at the exact sample. Within a global batch, sample j goes to
(accumulation step j // (dp*mbs), DP rank (j // mbs) % dp), so any DP degree sees the same
global batch and the averaged gradient is the same.
"""

from __future__ import annotations

import numpy as np
import torch


def build_datasets(args, seq_length: int, samples: tuple[int, int, int], seed: int):
    """(train, valid, test) from ``--data-path`` / ``--split``; rank 0 builds indexes first."""
    import torch.distributed as dist

    from mtnlg.data.gpt_dataset import build_train_valid_test_datasets

    def build():
        return build_train_valid_test_datasets(
            data_path=list(args.data_path),
            split=args.split,
            seq_length=seq_length,
            seed=seed,
            train_valid_test_num_samples=samples,
            cache_dir=args.data_cache_path,
        )

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        out = build()
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        out = build()
    return out


def check_data_path(data_path: list[str] | None) -> None:
    """Fail fast on a missing ``--data-path`` or a prefix without its .bin/.idx files."""
    from pathlib import Path

    from mtnlg.data.blending import parse_data_path

    if not data_path:
        raise ValueError("--data-path is required")
    for _, prefix in parse_data_path(list(data_path)):
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).is_file():
                raise ValueError(f"--data-path {prefix}: {prefix + ext} does not exist")


def to_batch(samples: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mbs, s+1) tokens -> (input_ids, labels), each (mbs, s) int64."""
    text = torch.from_numpy(np.stack(samples).astype(np.int64))
    return text[:, :-1].contiguous(), text[:, 1:].contiguous()


def rank_micro_batches(
    dataset, start: int, global_batch: int, micro: int, dp: int, dp_rank: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch [start, start + global_batch).

    A dataset with a ``micro_batch(sample_ids)`` method builds its own (the distillation
    cache adds the teacher's top-k to the labels)."""
    gas = global_batch // (micro * dp)
    build = getattr(dataset, "micro_batch", None)
    out = []
    for g in range(gas):
        first = start + (g * dp + dp_rank) * micro
        ids = range(first, first + micro)
        out.append(build(ids) if build else to_batch([dataset[i]["text"] for i in ids]))
    return out


def _map_tensors(fn, x):
    """``fn`` applied to a tensor, or to each tensor of a tuple (``KDLabels``, (labels, mask))."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_map_tensors(fn, t) for t in x)
    return x


def _pin(t: torch.Tensor) -> torch.Tensor:
    """Page-locked when the accelerator pins host memory (DeepSpeed's CPU accelerator: a no-op)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().pin_memory(t)


class StepLoader:
    """This rank's micro-batches of each training step, one step ahead on a background thread.

    ``get(start, global_batch)`` returns the micro-batches ``rank_micro_batches`` builds for that
    step (the same samples in the same order, so resumption stays exact), with the parts this
    pipeline stage uses (the first stage's input ids, the last stage's labels) pinned (when the
    accelerator pins) and copied to ``device`` with ``non_blocking=True``; the other parts stay
    on the host. Middle pipeline stages never read the dataset: they get ``None`` per
    micro-batch (DeepSpeed loads data on the first and last stages only).
    ``prefetch(start, global_batch)`` builds a later step's host batches while this one runs.
    """

    def __init__(self, dataset, micro: int, dp: int, dp_rank: int, device, first=True, last=True):
        from concurrent.futures import ThreadPoolExecutor

        self.dataset, self.micro, self.dp, self.dp_rank = dataset, micro, dp, dp_rank
        self.device, self.first, self.last = torch.device(device), first, last
        self._pending = None  # ((start, global_batch), future)
        self._pool = None
        if first or last:
            self._pool = ThreadPoolExecutor(
                1, "mtnlg-data", initializer=_bind_device, initargs=(self.device,)
            )

    def _host(self, start: int, global_batch: int) -> list:
        out = rank_micro_batches(
            self.dataset, start, global_batch, self.micro, self.dp, self.dp_rank
        )
        first, last = self.first, self.last
        return [
            (_map_tensors(_pin, ids) if first else ids, _map_tensors(_pin, lab) if last else lab)
            for ids, lab in out
        ]

    def prefetch(self, start: int, global_batch: int) -> None:
        """Start building step [start, start + global_batch) in the background."""
        if self._pool is None or (self._pending and self._pending[0] == (start, global_batch)):
            return
        self._pending = ((start, global_batch), self._pool.submit(self._host, start, global_batch))

    def get(self, start: int, global_batch: int) -> list:
        """Step [start, start + global_batch)'s micro-batches for this stage (see the class)."""
        if self._pool is None:
            return [None] * (global_batch // (self.micro * self.dp))
        pending, self._pending = self._pending, None
        if pending and pending[0] == (start, global_batch):
            host = pending[1].result()
        else:
            host = self._host(start, global_batch)

        def move(t):
            return t.to(self.device, non_blocking=True)

        return [
            (
                _map_tensors(move, ids) if self.first else ids,
                _map_tensors(move, lab) if self.last else lab,
            )
            for ids, lab in host
        ]

    def close(self) -> None:
        """Stop the background thread (a step built ahead and never taken is dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> StepLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bind_device(device: torch.device) -> None:
    """The loader thread pins on the engine's device (not device 0, CUDA's per-thread default)."""
    if device.type != "cpu" and device.index is not None:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_device(device.index)


def stage_loader(dataset, micro: int, topo, device) -> StepLoader:
    """A :class:`StepLoader` for this rank's DP rank and pipeline stage."""
    return StepLoader(
        dataset, micro, topo.dp, topo.dp_rank, device, topo.is_first_stage, topo.is_last_stage
    )
