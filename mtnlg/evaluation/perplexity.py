"""Perplexity of an mtnlg checkpoint, at the TP/PP it was saved with (any DP on top).

Windows: the text is tokenized without EOD and cut into consecutive non-overlapping windows
of ``seq_length + 1`` tokens (a final partial window of >= 2 tokens is kept); every next-token
target of every window is counted once. Loss = mean NLL in nats over all targets.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def text_windows(ids: list[int], seq_length: int) -> list[np.ndarray]:
    """Non-overlapping windows of seq_length+1 tokens; a final one of >= 2 tokens kept."""
    w = seq_length + 1
    out = [np.asarray(ids[i : i + w], dtype=np.int64) for i in range(0, len(ids), w)]
    return [x for x in out if len(x) >= 2]


def dataset_windows(
    data_path: list[str], split: str, seq_length: int, seed: int, max_samples: int | None
) -> list[np.ndarray]:
    """The validation split as Megatron samples (one epoch of its documents, or max_samples)."""
    from mtnlg.data.blending import parse_data_path
    from mtnlg.data.gpt_dataset import build_train_valid_test_datasets, split_boundaries
    from mtnlg.data.indexed_dataset import MMapIndexedDataset

    tokens = 0
    for _, prefix in parse_data_path(data_path):
        ds = MMapIndexedDataset(prefix)
        lo, hi = split_boundaries(split, len(ds))[1:3]
        tokens += int(ds.sizes[lo:hi].sum())
    n = max(1, tokens // seq_length)
    if max_samples:
        n = min(n, max_samples)
    _, valid, _ = build_train_valid_test_datasets(data_path, split, seq_length, seed, (0, n, 0))
    if valid is None:
        raise SystemExit(f"error: --split {split!r} leaves no validation documents")
    return [valid[i]["text"] for i in range(n)]


def _padded(window: np.ndarray, seq_length: int):
    """(1, s) input ids, labels and loss mask for one window (padding masked out)."""
    n = len(window) - 1
    ids = torch.zeros(1, seq_length, dtype=torch.long)
    labels = torch.zeros(1, seq_length, dtype=torch.long)
    mask = torch.zeros(1, seq_length, dtype=torch.float32)
    t = torch.from_numpy(window)
    ids[0, :n], labels[0, :n], mask[0, :n] = t[:-1], t[1:], 1.0
    return ids, labels, mask


@torch.no_grad()
def evaluate_windows(engine, topo, windows: list[np.ndarray], seq_length: int) -> dict:
    """Sum NLL and count targets over ``windows`` (split across DP ranks); all ranks agree."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    engine.eval()
    nll = torch.zeros(2, dtype=torch.float64)  # (sum of NLL, number of targets)
    mine = windows[topo.dp_rank :: topo.dp]
    per_rank = math.ceil(len(windows) / topo.dp)
    empty = np.zeros(2, dtype=np.int64)
    for i in range(per_rank):  # every DP rank runs the same number of steps
        w = mine[i] if i < len(mine) else empty
        ids, labels, mask = _padded(w, seq_length)
        count = float(mask.sum())
        if count == 0:
            mask[0, 0] = 1.0  # a dummy target keeps the loss finite; not counted
        if isinstance(engine, PipelineEngine):
            batch = (ids, (labels, mask))
            loss = float(engine.eval_batch(data_iter=iter([batch]), num_micro_batches=1))
        else:
            dev = engine.device
            loss = float(engine(ids.to(dev), (labels.to(dev), mask.to(dev))))
        nll += torch.tensor([loss * count, count], dtype=torch.float64)
    if topo.dp > 1:
        dist.all_reduce(nll, group=topo.dp_group)
    total, count = float(nll[0]), int(nll[1])
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def write_json(path: str, result: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, p)
