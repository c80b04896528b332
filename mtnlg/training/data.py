"""Training data for one rank: datasets from flags, and this rank's micro-batches per step.

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
