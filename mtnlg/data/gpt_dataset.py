"""GPT pre-training samples: ``seq_length + 1`` tokens cut across document boundaries.

Megatron's scheme: ``doc_idx`` is the split's documents repeated for enough epochs and shuffled
(the last epoch shuffled on its own when it is used for less than 80 %); ``sample_idx[i]`` is
the (position in doc_idx, token offset) where sample ``i`` starts, samples overlapping by one
token; ``shuffle_idx`` permutes the samples. Everything comes from ``np.random.RandomState(seed)``
so the sample order is a pure function of (data, documents, num_samples, seq_length, seed):
resuming after ``n`` consumed samples is ``dataset[n], dataset[n + 1], ...``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from mtnlg.data.blending import BlendedDataset, parse_data_path, samples_per_dataset
from mtnlg.data.errors import DataError
from mtnlg.data.indexed_dataset import MMapIndexedDataset

LAST_EPOCH_THRESHOLD = 0.80


def num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs giving ``num_samples`` samples of ``seq_length`` (+1 overlap) tokens."""
    need = num_samples * seq_length + 1
    return max(1, -(-need // tokens_per_epoch))


def build_index_arrays(
    sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx int32 [E*docs], sample_idx int64 [S+1, 2], shuffle_idx int64 [S])."""
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    if tokens_per_epoch <= 1:
        raise DataError(f"documents hold {tokens_per_epoch} tokens: too few to make samples")
    epochs = num_epochs(tokens_per_epoch, seq_length, num_samples)
    separate_last = False
    if epochs > 1:
        from_earlier = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_last = num_samples - from_earlier < int(LAST_EPOCH_THRESHOLD * per_epoch)
    rng = np.random.RandomState(seed=seed)

    def shuffled_epochs(n: int) -> np.ndarray:
        idx = np.tile(documents.astype(np.int32), n)
        rng.shuffle(idx)
        return idx

    if separate_last:
        doc_idx = np.concatenate([shuffled_epochs(epochs - 1), shuffled_epochs(1)])
    else:
        doc_idx = shuffled_epochs(epochs)

    # sample i covers global token positions [i * seq_length, (i + 1) * seq_length]
    lens = sizes[doc_idx].astype(np.int64)
    starts = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    total_samples = (int(lens.sum()) - 1) // seq_length
    pos = np.arange(total_samples + 1, dtype=np.int64) * seq_length
    where = np.searchsorted(starts, pos, side="right") - 1
    sample_idx = np.stack([where, pos - starts[where]], axis=1)

    first = from_earlier if separate_last else total_samples
    shuffle_idx = np.arange(first, dtype=np.int64)
    rng.shuffle(shuffle_idx)
    if first < total_samples:
        last = np.arange(first, total_samples, dtype=np.int64)
        rng.shuffle(last)
        shuffle_idx = np.concatenate([shuffle_idx, last])
    return doc_idx, sample_idx, shuffle_idx


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class GPTDataset:
    """``num_samples`` samples of ``seq_length + 1`` tokens from ``documents`` of a dataset.

    Index arrays are cached as ``.npy`` in ``cache_dir`` (default: next to the data), written
    atomically and reused when every parameter matches; unwritable dirs fall back to memory.
    """

    def __init__(
        self,
        name: str,
        indexed_dataset: MMapIndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str | Path | None = None,
    ):
        if num_samples <= 0 or seq_length <= 0:
            raise ValueError(f"num_samples ({num_samples}) and seq_length must be > 0")
        documents = np.asarray(documents, dtype=np.int32)
        if len(documents) == 0:
            raise ValueError(f"{name}: no documents")
        if documents.min() < 0 or documents.max() >= len(indexed_dataset):
            raise ValueError(f"{name}: document ids outside [0, {len(indexed_dataset)})")
        self.name, self.indexed_dataset = name, indexed_dataset
        self.num_samples, self.seq_length, self.seed = num_samples, seq_length, seed
        args = (indexed_dataset.sizes, documents, num_samples, seq_length, seed)
        self.cache_paths = self._cache_paths(documents, cache_dir)
        self.doc_idx, self.sample_idx, self.shuffle_idx = self._load_or_build(args)

    def _cache_paths(self, documents: np.ndarray, cache_dir) -> list[Path]:
        ds = self.indexed_dataset
        h = hashlib.sha1(documents.tobytes())
        h.update(ds.sizes.tobytes())
        h.update(f"{ds.dtype}|{self.num_samples}|{self.seq_length}|{self.seed}".encode())
        base = Path(cache_dir) if cache_dir is not None else Path(ds.prefix).parent
        stem = (
            f"{Path(ds.prefix).name}_{self.name}_indexmap_{self.num_samples}ns_"
            f"{self.seq_length}sl_{self.seed}s_{h.hexdigest()[:12]}"
        )
        return [base / f"{stem}_{kind}.npy" for kind in ("doc_idx", "sample_idx", "shuffle_idx")]

    def _load_or_build(self, args):
        if all(p.is_file() for p in self.cache_paths):
            try:
                return tuple(
                    np.load(p, mmap_mode="r", allow_pickle=False) for p in self.cache_paths
                )
            except (OSError, ValueError):
                pass  # unreadable cache: rebuild it
        arrays = build_index_arrays(*args)
        try:
            self.cache_paths[0].parent.mkdir(parents=True, exist_ok=True)
            for path, arr in zip(self.cache_paths, arrays, strict=True):
                _save_atomic(path, arr)
        except OSError as e:
            print(f"warning: cannot cache GPT index arrays ({e}); kept in memory", file=sys.stderr)
        return arrays

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"{self.name}: sample {idx} out of range for {self.num_samples}")
        i = int(self.shuffle_idx[idx])
        (doc_f, off_f), (doc_l, off_l) = self.sample_idx[i], self.sample_idx[i + 1]
        get, doc_idx = self.indexed_dataset.get, self.doc_idx
        if doc_f == doc_l:
            parts = [get(int(doc_idx[doc_f]), int(off_f), int(off_l - off_f + 1))]
        else:
            parts = [get(int(doc_idx[doc_f]), int(off_f))]
            parts += [get(int(doc_idx[d])) for d in range(doc_f + 1, doc_l)]
            parts.append(get(int(doc_idx[doc_l]), 0, int(off_l + 1)))
        tokens = np.concatenate(parts).astype(np.int64)  # [seq_length + 1]
        return {"text": tokens}


def split_boundaries(split: str, num_documents: int) -> list[int]:
    """Megatron ``--split "969,30,1"`` -> document boundaries [0, a, b, num_documents]."""
    try:
        parts = [float(s) for s in split.replace("/", ",").split(",") if s.strip()]
    except ValueError:
        raise DataError(f"--split {split!r}: expected numbers like 969,30,1") from None
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DataError(f"--split {split!r}: weights must be >= 0 and not all 0")
    total = sum(parts)
    bounds = [0]
    for p in parts:
        bounds.append(bounds[-1] + int(round(p / total * num_documents)))
    diff = bounds[-1] - num_documents
    return [bounds[0]] + [b - diff for b in bounds[1:]]


def _build_split(prefix, split, seq_length, seed, counts, cache_dir) -> list:
    ds = MMapIndexedDataset(prefix)
    bounds = split_boundaries(split, len(ds))
    out = []
    for i, (name, n) in enumerate(zip(("train", "valid", "test"), counts, strict=True)):
        docs = np.arange(bounds[i], bounds[i + 1], dtype=np.int32)
        ok = n > 0 and len(docs) > 0
        out.append(GPTDataset(name, ds, docs, n, seq_length, seed, cache_dir) if ok else None)
    return out


def build_train_valid_test_datasets(
    data_path: list[str],
    split: str,
    seq_length: int,
    seed: int,
    train_valid_test_num_samples: tuple[int, int, int],
    cache_dir: str | Path | None = None,
):
    """(train, valid, test) datasets, ``GPTDataset`` or ``BlendedDataset``; ``None`` for a split
    with no documents or no samples requested. A blend drops, per split, the prefixes that have
    no documents in it and renormalises the remaining weights."""
    pairs = parse_data_path(data_path)
    nums = tuple(int(n) for n in train_valid_test_num_samples)
    if len(pairs) == 1:
        return tuple(_build_split(pairs[0][1], split, seq_length, seed, nums, cache_dir))
    doc_counts = [len(MMapIndexedDataset(p)) for _, p in pairs]
    result = []
    for s, n in enumerate(nums):
        has_docs = [np.diff(split_boundaries(split, c))[s] > 0 for c in doc_counts]
        weights = [w if ok else 0.0 for (w, _), ok in zip(pairs, has_docs, strict=True)]
        if n <= 0 or sum(weights) <= 0:
            result.append(None)
            continue
        need = samples_per_dataset(weights, n)
        parts = []
        for (_, prefix), k in zip(pairs, need, strict=True):
            counts = [0, 0, 0]
            counts[s] = int(k)
            parts.append(_build_split(prefix, split, seq_length, seed, counts, cache_dir)[s])
        result.append(BlendedDataset(parts, weights, n))
    return tuple(result)
