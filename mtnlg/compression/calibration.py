"""The calibration pass: samples from ``--calib-data``, forward passes at the checkpoint's own
TP x PP (x DP), importance hooks on every stage.

``--calib-data`` is one of:

* a Megatron ``.bin/.idx`` prefix: the training split's samples (``--split``, shuffled by
  ``--seed`` exactly as training draws them), ``seq_length + 1`` tokens each;
* a JSON lines file (``.jsonl`` / ``.json``): each record's ``--json-keys`` text (default
  ``text``) tokenized with the checkpoint's tokenizer, the end-of-document token appended, all
  documents concatenated and cut into consecutive windows;
* any other file: raw text, tokenized whole and cut into consecutive windows.

The first ``--calib-samples`` full windows are used; a shorter tail window is not (every token
of a calibration sample is real, so no mask enters the statistics). The engine and the loop
are ``evaluate.py``'s (``evaluation.perplexity.evaluate_windows``): the calibration pass costs
an evaluation of the same tokens plus the hooks, and reports its loss too.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from mtnlg.data.errors import DataError


def _is_prefix(path: str) -> bool:
    return Path(path + ".bin").is_file() and Path(path + ".idx").is_file()


def _json_texts(path: Path, keys: list[str]):
    """Each record's text(s) of a JSON lines file; DataError naming FILE:LINE otherwise."""
    from mtnlg.data.readers import _pick, parse_json_line

    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            rec, err = parse_json_line(raw)
            texts = _pick(rec, keys) if err is None else err
            if isinstance(texts, str):
                raise DataError(f"--calib-data {path}:{n}: {texts}")
            yield from texts


def _cut(ids: list[int] | np.ndarray, seq: int, limit: int) -> list[np.ndarray]:
    w = seq + 1
    n = min(len(ids) // w, limit)
    arr = np.asarray(ids[: n * w], dtype=np.int64)
    return [arr[i * w : (i + 1) * w] for i in range(n)]


def calibration_windows(
    calib_data: str,
    tokenizer,
    seq: int,
    num_samples: int,
    *,
    split: str = "969,30,1",
    seed: int = 1234,
    json_keys: tuple[str, ...] = ("text",),
) -> tuple[list[np.ndarray], str]:
    """(up to ``num_samples`` windows of ``seq + 1`` tokens, the kind of data read)."""
    if _is_prefix(calib_data):
        from mtnlg.data.gpt_dataset import build_train_valid_test_datasets, split_boundaries
        from mtnlg.data.indexed_dataset import MMapIndexedDataset

        ds = MMapIndexedDataset(calib_data)
        lo, hi = split_boundaries(split, len(ds))[0:2]
        tokens = int(ds.sizes[lo:hi].sum())
        n = min(num_samples, max(0, (tokens - 1) // seq))
        if n == 0:
            raise DataError(f"--calib-data {calib_data}: the training split of --split {split} "
                            f"holds {tokens} tokens, less than one sample of {seq + 1}")  # fmt: skip
        train, _, _ = build_train_valid_test_datasets([calib_data], split, seq, seed, (n, 0, 0))
        return [np.asarray(train[i]["text"], dtype=np.int64) for i in range(n)], "megatron"
    p = Path(calib_data)
    if not p.is_file():
        raise DataError(f"--calib-data {calib_data}: no such file and no {calib_data}.bin/.idx")
    if tokenizer is None:
        raise DataError(f"--calib-data {calib_data}: the checkpoint ships no tokenizer for text")
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        ids: list[int] = []
        need = num_samples * (seq + 1)
        for text in _json_texts(p, list(json_keys)):
            ids += tokenizer.tokenize(text) + [tokenizer.eod]
            if len(ids) >= need:
                break
        kind = "jsonl"
    else:
        ids, kind = tokenizer.tokenize(p.read_text(encoding="utf-8")), "text"
    windows = _cut(ids, seq, num_samples)
    if not windows:
        raise DataError(f"--calib-data {calib_data}: {len(ids)} tokens, less than one window")
    return windows, kind


def real_rows(num_windows: int, topo, micro: int) -> list[int]:
    """Per micro-batch of this DP rank (``evaluate_windows``' order), its real rows."""
    mine = len(range(topo.dp_rank, num_windows, topo.dp))
    n_micro = math.ceil(math.ceil(num_windows / topo.dp) / micro)
    return [max(0, min(micro, mine - i * micro)) for i in range(n_micro)]


def calibrate(engine, topo, cfg, windows, seq: int, micro: int, progress: bool = False) -> dict:
    """Run the pass with the hooks: {"scores", "fingerprint", "loss", "tokens", "seconds"}."""
    from mtnlg.compression.importance import ImportanceCollector, StageView, weight_fingerprint
    from mtnlg.evaluation.perplexity import evaluate_windows

    stage = StageView.of(engine, topo, cfg)
    collector = ImportanceCollector(stage, cfg, real_rows(len(windows), topo, micro))
    start = time.perf_counter()
    try:
        result = evaluate_windows(engine, topo, windows, seq, micro, progress=progress)
    finally:
        collector.remove()
    scores = collector.finish(topo, engine.device)
    seconds = time.perf_counter() - start
    return {
        "scores": scores,
        "fingerprint": weight_fingerprint(stage, cfg, topo),
        "loss": result["loss"],
        "tokens": result["tokens"],
        "seconds": seconds,
    }
