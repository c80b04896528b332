"""Document readers for preprocessing: JSON lines (optionally gzipped), JSON arrays, parquet,
CSV, plain text and Hugging Face ``datasets``. Each yields ``(texts, nbytes)``: one string per
requested key, and the input size of the record, and raises ``DataError`` naming file and line
(or dataset row) for bad records.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mtnlg.data.errors import DataError

JSON_SUFFIXES = {".jsonl", ".json", ".ndjson", ".jsonlines"}
TEXT_SUFFIXES = {".txt", ".text"}


@dataclass
class ReadStats:
    """Counters shared by all readers of one preprocessing run."""

    bad_lines: int = 0
    """Records dropped by ``--skip-bad-lines`` (malformed JSON, missing key, bad UTF-8)."""
    bad_examples: list[str] = field(default_factory=list)
    """The first few such errors, for the final report."""


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Expand files and globs in order; an input that matches nothing is an error."""
    files: list[Path] = []
    for pat in patterns:
        matches = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise DataError(f"--input {pat}: no such file")
        files.extend(Path(m) for m in matches)
    return files


def input_format(path: Path) -> str:
    """``json``, ``parquet``, ``csv`` or ``text`` from the suffix (``.gz`` stripped)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".parquet":
        return "parquet"
    if last == ".csv":
        return "csv"
    if last in TEXT_SUFFIXES:
        return "text"
    return "json"  # Megatron's "loose json": one object per line, any file name


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _bad(stats: ReadStats, skip: bool, where: str, msg: str) -> None:
    if not skip:
        raise DataError(f"{where}: {msg} (use --skip-bad-lines to skip such records)")
    stats.bad_lines += 1
    if len(stats.bad_examples) < 5:
        stats.bad_examples.append(f"{where}: {msg}")


def _pick(record, keys: list[str]) -> list[str] | str:
    """The texts for ``keys``, or an error message."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    out = []
    for k in keys:
        if k not in record or record[k] is None:
            return f"missing key {k!r}"
        if not isinstance(record[k], str):
            return f"key {k!r} is {type(record[k]).__name__}, not a string"
        out.append(record[k])
    return out


def parse_json_line(raw: bytes) -> tuple[object, str | None]:
    """``(value, None)`` for one line of JSON lines, or ``(None, what is wrong with it)``."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at column {e.colno})"


def _read_json(path: Path, keys, stats, skip) -> Iterator[tuple[list[str], int]]:
    with _open_binary(path) as f:
        head = f.read(1 << 12).lstrip()
        f.seek(0)
        if head.startswith(b"["):  # a JSON array of objects
            try:
                records = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path}: not valid JSON: {e}") from e
            for i, rec in enumerate(records):
                texts = _pick(rec, keys)
                if isinstance(texts, str):
                    _bad(stats, skip, f"{path}: element {i}", texts)
                    continue
                yield texts, sum(len(t) for t in texts)
            return
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            rec, err = parse_json_line(raw)
            if err is not None:
                _bad(stats, skip, where, err)
                continue
            texts = _pick(rec, keys)
            if isinstance(texts, str):
                _bad(stats, skip, where, texts)
                continue
            yield texts, len(raw)


def _read_parquet(path: Path, keys, stats, skip) -> Iterator[tuple[list[str], int]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read parquet: {e}") from e
    missing = [k for k in keys if k not in pf.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (--json-keys)")
    row = 0
    for batch in pf.iter_batches(columns=keys, batch_size=4096):
        cols = [batch.column(k).to_pylist() for k in keys]
        for texts in zip(*cols, strict=True):
            row += 1
            texts = _pick(dict(zip(keys, texts, strict=True)), keys)
            if isinstance(texts, str):
                _bad(stats, skip, f"{path}: row {row}", texts)
                continue
            yield texts, sum(len(t) for t in texts)


def _read_csv(path: Path, keys, stats, skip) -> Iterator[tuple[list[str], int]]:
    csv.field_size_limit(sys.maxsize)
    with _open_binary(path) as fb:
        text = io.TextIOWrapper(fb, encoding="utf-8", errors="strict", newline="")
        reader = csv.DictReader(text)
        try:
            for rec in reader:
                texts = _pick(rec, keys)
                if isinstance(texts, str):
                    _bad(stats, skip, f"{path}:{reader.line_num}", texts)
                    continue
                yield texts, sum(len(t) for t in texts)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: invalid UTF-8 near line {reader.line_num + 1}") from e


def _read_text(path: Path, keys, stats, skip) -> Iterator[tuple[list[str], int]]:
    if keys != ["text"]:
        raise DataError(f"{path}: plain-text input has only the key 'text', not {keys}")
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _bad(stats, skip, f"{path}:{lineno}", f"invalid UTF-8 ({e.reason})")
                continue
            yield [line.rstrip("\r\n")], len(raw)


READERS = {"json": _read_json, "parquet": _read_parquet, "csv": _read_csv, "text": _read_text}


# ---- Hugging Face datasets -------------------------------------------------------------------

# A single local data file given to --hf-dataset: datasets' packaged builder for its suffix.
HF_FILE_BUILDERS = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".ndjson": ("json", {}),
    ".csv": ("csv", {"na_filter": False}),  # text verbatim: "NA", "null", "" stay strings
    ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE, "na_filter": False}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
    ".txt": ("text", {}),
}
_SAVED = ("dataset_dict.json", "state.json")  # what save_to_disk writes (DatasetDict, Dataset)


def hf_label(name: str, split: str | None) -> str:
    """``hf:NAME[split]`` (``hf:NAME`` before the split is known): for messages."""
    return f"hf:{name}[{split}]" if split else f"hf:{name}"


def _pick_split(splits: list[str], split: str | None, name: str) -> str:
    if split is None:
        if len(splits) != 1:
            raise DataError(f"--hf-dataset {name}: choose a split with --hf-split ({splits})")
        return splits[0]
    if split not in splits:
        raise DataError(f"--hf-dataset {name}: no split {split!r} (--hf-split); has {splits}")
    return split


def _disk_rows(ds, batch_size: int) -> Iterator[dict]:
    """Rows of an Arrow-backed ``Dataset`` (memory-mapped), a batch of columns at a time."""
    for batch in ds.iter(batch_size=batch_size):
        cols = list(batch)
        yield from (dict(zip(cols, vals, strict=True)) for vals in zip(*batch.values()))


def _open_hf(name: str, split: str | None, batch_size: int) -> tuple[Iterator[dict], str | None]:
    """(row iterator, split used); never materializes the dataset as Python objects."""
    import datasets

    path = Path(name)
    if path.is_dir() and any((path / f).is_file() for f in _SAVED):
        ds = datasets.load_from_disk(str(path))  # Arrow files, memory-mapped
        if isinstance(ds, datasets.DatasetDict):
            split = _pick_split(list(ds), split, name)
            ds = ds[split]
        else:  # one Dataset: its recorded split, else "train" (as datasets names a lone file)
            split = _pick_split([str(ds.split) if ds.split else "train"], split, name)
        return _disk_rows(ds, batch_size), split
    if path.is_file():
        if path.suffix.lower() not in HF_FILE_BUILDERS:
            raise DataError(
                f"--hf-dataset {name}: unknown data file type {path.suffix!r} "
                f"(one of {', '.join(HF_FILE_BUILDERS)})"
            )
        builder, kwargs = HF_FILE_BUILDERS[path.suffix.lower()]
        split = _pick_split(["train"], split, name)  # datasets calls a lone file "train"
        ds = datasets.load_dataset(
            builder, data_files={"train": str(path)}, split=split, streaming=True, **kwargs
        )
        return iter(ds), split
    ds = datasets.load_dataset(name, split=split, streaming=True)  # a data folder or hub name
    if isinstance(ds, datasets.IterableDatasetDict):
        split = _pick_split(list(ds), None, name)
        ds = ds[split]
    return iter(ds), split


def iter_hf_rows(
    name: str, split: str | None, batch_size: int = 1024
) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for every row of a Hugging Face dataset, streamed, in order.

    ``name``: a folder written by ``save_to_disk`` (read with ``load_from_disk``), a local data
    file (by suffix) or folder ``datasets.load_dataset`` reads, or a hub name (when online).
    ``where`` is ``hf:NAME[split]#row`` with the 0-based row index.
    """
    try:
        rows, split = _open_hf(name, split, batch_size)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFound, ValueError, hub errors)
        raise DataError(f"--hf-dataset {name}: cannot open: {type(e).__name__}: {e}") from e
    label = hf_label(name, split)
    row = 0
    try:
        for rec in rows:
            yield f"{label}#{row}", rec
            row += 1
    except Exception as e:  # e.g. a malformed line inside a streamed data file
        raise DataError(f"{label}: cannot read after {row} rows: {type(e).__name__}: {e}") from e


def iter_hf_documents(
    name: str, split: str | None, keys: list[str], stats: ReadStats, skip: bool = False
) -> Iterator[tuple[list[str], int]]:
    """Like :func:`iter_documents` for a Hugging Face dataset (``--hf-dataset``)."""
    for where, rec in iter_hf_rows(name, split):
        texts = _pick(rec, keys)
        if isinstance(texts, str):
            _bad(stats, skip, where, texts)
            continue
        yield texts, sum(len(t) for t in texts)


def iter_documents(
    paths: list[Path], keys: list[str], stats: ReadStats, skip_bad_lines: bool = False
) -> Iterator[tuple[list[str], int]]:
    """Yield ``(texts, nbytes)`` for every record of every file, in order."""
    for path in paths:
        try:
            yield from READERS[input_format(path)](path, keys, stats, skip_bad_lines)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: cannot read: {e}") from e
