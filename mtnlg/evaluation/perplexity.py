"""Perplexity of an mtnlg checkpoint, at the TP/PP it was saved with (any DP on top).

Windows: the text is tokenized without EOD and cut into consecutive non-overlapping windows
of ``seq_length + 1`` tokens (a final partial window of >= 2 tokens is kept); every next-token
target of every window is counted once. Loss = mean NLL in nats over all targets.

Windows go through the model ``--micro-batch-size`` at a time (shorter ones padded, padding
masked out), many micro-batches per pipeline call; exact NLL sums and target counts are reduced.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mtnlg.training.forward import forward_only


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


MICRO_BATCHES_PER_CALL = 32
"""Micro-batches per forward-only call: the pipeline fills once for all of them."""


def _micro_batch(windows: list[np.ndarray], skips: list[int], micro: int, seq_length: int):
    """(m, s) input ids, labels and loss mask for up to ``micro`` windows: a window's first
    ``skip`` targets (context only) and the padding are masked out."""
    ids = torch.zeros(micro, seq_length, dtype=torch.long)
    labels = torch.zeros(micro, seq_length, dtype=torch.long)
    mask = torch.zeros(micro, seq_length, dtype=torch.float32)
    for row, (window, skip) in enumerate(zip(windows, skips, strict=True)):
        n, t = len(window) - 1, torch.from_numpy(window)
        ids[row, :n], labels[row, :n], mask[row, skip:n] = t[:-1], t[1:], 1.0
    return ids, labels, mask


def _micro_batches(windows: list[np.ndarray], skips: list[int], n: int, micro: int, seq: int):
    """``n`` micro-batches of ``windows``, the last ones padded with empty rows."""
    for i in range(n):
        part = slice(i * micro, (i + 1) * micro)
        yield _micro_batch(windows[part], skips[part], micro, seq)


@torch.no_grad()
def evaluate_windows(
    engine,
    topo,
    windows: list[np.ndarray],
    seq_length: int,
    micro_batch: int = 1,
    skips: list[int] | None = None,
    progress: bool = False,
) -> dict:
    """Sum NLL and count targets over ``windows`` (split across DP ranks); all ranks agree.

    ``skips[i]``: how many leading targets of window ``i`` are context only (default none);
    ``progress``: a tqdm bar on global rank 0. The result also holds ``nll_sum``. Each
    micro-batch's loss is the mean NLL over its targets, so ``loss x targets`` is its NLL
    sum; sums and counts (never means) are reduced, in float64 on the engine's device: over the
    pipeline (only the last stage has losses) and over DP. TP ranks hold the same loss.
    """
    dev = engine.device
    nll = torch.zeros(2, dtype=torch.float64, device=dev)  # (sum of NLL, number of targets)
    skips = [0] * len(windows) if skips is None else skips
    if len(skips) != len(windows):
        raise ValueError(f"{len(skips)} skips for {len(windows)} windows")
    mine, my_skips = windows[topo.dp_rank :: topo.dp], skips[topo.dp_rank :: topo.dp]
    # every DP rank runs the same number of micro-batches (empty rows count no target)
    n_micro = math.ceil(math.ceil(len(windows) / topo.dp) / micro_batch)
    batches = _micro_batches(mine, my_skips, n_micro, micro_batch, seq_length)
    bar = progress_bar(n_micro * micro_batch * topo.dp, "windows", progress and topo.rank == 0)
    for first in range(0, n_micro, MICRO_BATCHES_PER_CALL):
        k = min(MICRO_BATCHES_PER_CALL, n_micro - first)
        chunk = [next(batches) for _ in range(k)]
        if bar is not None:
            bar.update(k * micro_batch * topo.dp)
        counts = torch.tensor([float(m.sum()) for _, _, m in chunk], dtype=torch.float64)
        # per-micro-batch mean losses where the outputs are (no DP averaging), None elsewhere
        losses = forward_only(engine, topo, [(ids, (lab, mask)) for ids, lab, mask in chunk])
        if losses is None:
            continue
        losses = torch.stack([x.reshape(()) for x in losses])
        counts = counts.to(dev)
        sums = torch.where(counts > 0, losses.double() * counts, 0.0)  # all-padding: no loss
        nll[0] += sums.sum()
        nll[1] += counts.sum()
    if topo.pp > 1:  # the last stage's sums to every stage
        dist.all_reduce(nll, group=topo.pp_group)
    if topo.dp > 1:
        dist.all_reduce(nll, group=topo.dp_group)
    if bar is not None:
        bar.close()
    total, count = nll.tolist()
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count), "nll_sum": total}


def progress_bar(total: int, unit: str, enabled: bool):
    """A tqdm bar (to stderr) when ``enabled`` (pass ``rank == 0``), else None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="evaluate", unit=unit, dynamic_ncols=True)


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)


def write_json(path: str, result: dict) -> None:
    atomic_write(path, json.dumps(result, indent=2) + "\n")
