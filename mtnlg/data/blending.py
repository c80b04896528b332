"""Blend several datasets with fixed weights (``--data-path 0.3 prefixA 0.7 prefixB``).

The sample order is a pure function of ``(weights, num_samples)``: dataset ``d`` owns the
"due times" ``(k + 0.5) / w_d`` for its k-th sample, and all due times are merged in order.
So over any prefix of samples each dataset's count is within ``(D + 1) / 2`` of ``w_d * n``
(D datasets), i.e. the weights hold exactly up to rounding over every window.
"""

from __future__ import annotations

import math

import numpy as np

from mtnlg.data.errors import DataError


def parse_data_path(data_path: list[str]) -> list[tuple[float, str]]:
    """Megatron ``--data-path``: ``["prefix"]`` or ``["0.3", "pA", "0.7", "pB"]`` ->
    ``[(weight, prefix), ...]`` with weights normalised to sum 1."""
    if not data_path:
        raise DataError("--data-path: empty")
    if len(data_path) == 1:
        return [(1.0, data_path[0])]
    if len(data_path) % 2:
        raise DataError(f"--data-path: expected weight/prefix pairs, got {data_path}")
    pairs = []
    for w, prefix in zip(data_path[0::2], data_path[1::2], strict=True):
        try:
            weight = float(w)
        except ValueError:
            raise DataError(
                f"--data-path: weight {w!r} (before {prefix!r}) is not a number"
            ) from None
        if not math.isfinite(weight) or weight < 0:
            raise DataError(f"--data-path: weight {w!r} must be finite and >= 0")
        pairs.append((weight, prefix))
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise DataError("--data-path: weights sum to 0")
    return [(w / total, p) for w, p in pairs]


def blending_indices(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """For each blended sample: (dataset index int16 [N], sample index in it int64 [N])."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    times, owners, ranks = [], [], []
    for d, wd in enumerate(w):
        if wd <= 0:
            continue
        k = np.arange(math.ceil(wd * num_samples) + 2, dtype=np.int64)
        times.append((k + 0.5) / wd)
        owners.append(np.full(len(k), d, dtype=np.int16))
        ranks.append(k)
    t, own, rank = (np.concatenate(x) for x in (times, owners, ranks))
    order = np.lexsort((own, t))[:num_samples]  # by time, ties by dataset
    return own[order], rank[order]


class BlendedDataset:
    """``datasets`` mixed with ``weights`` into ``num_samples`` samples (indexable, resumable).

    A dataset may be ``None`` when the blend takes no sample from it (weight 0).
    """

    def __init__(self, datasets: list, weights: list[float], num_samples: int):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("need one weight per dataset and at least one dataset")
        self.datasets = datasets
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.num_samples = num_samples
        self.dataset_index, self.dataset_sample_index = blending_indices(weights, num_samples)
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, (ds, need) in enumerate(zip(datasets, counts, strict=True)):
            if need and (ds is None or len(ds) < need):
                raise ValueError(f"dataset {d} has {len(ds)} samples, blending needs {need}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int):
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples}")
        d = int(self.dataset_index[idx])
        return self.datasets[d][int(self.dataset_sample_index[idx])]


def samples_per_dataset(weights, num_samples: int) -> np.ndarray:
    """How many samples each dataset contributes to a blend of ``num_samples``."""
    own, _ = blending_indices(weights, num_samples)
    return np.bincount(own, minlength=len(weights))
