"""Fine-tuning records, streamed from TSV, CSV, JSON lines, JSON or Hugging Face ``datasets``.

Every record carries ``where``, the place a message about it names:

* ``.tsv`` (GLUE style): a header row, then one record per line, fields split on tabs with *no*
  quote processing (SST-2 sentences contain quote characters). ``where`` is ``FILE:LINE``, the
  1-based file line (the header is line 1, so data starts at line 2); empty lines are skipped.
* ``.csv``: a header row, read with the ``csv`` module (quoted fields may span lines; ``where``
  is the line the record starts on).
* ``.jsonl`` / ``.ndjson``: one JSON object per line (``FILE:LINE``); blank lines are skipped.
* ``.json``: one JSON array of objects, or an object whose ``"data"`` key holds that array (the
  layout ``datasets``' json loader reads with ``field="data"``). The file is parsed whole (use
  JSON lines for large data); ``where`` is ``FILE#INDEX`` (0-based element index).
* Hugging Face ``datasets`` (``--hf-dataset``/``--hf-split``): a ``save_to_disk`` folder, local
  data files ``load_dataset`` reads, or a hub name; streamed, never materialized as Python lists.
  ``where`` is ``hf:NAME[split]#ROW`` (0-based row, as ``ds[ROW]``).

TSV/CSV values are strings; JSON and ``datasets`` values keep their types.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mtnlg.data.errors import DataError
from mtnlg.data.readers import hf_label, iter_hf_rows, parse_json_line

__all__ = ["DataError", "Record", "RecordSource", "field", "read_records"]

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}


@dataclass(frozen=True)
class RecordSource:
    """Where records come from: a file (format from its suffix) or a Hugging Face dataset."""

    path: str | None = None
    """A ``.tsv`` / ``.csv`` / ``.jsonl`` / ``.json`` file."""
    hf_dataset: str | None = None
    """A ``save_to_disk`` folder, a local data file/folder ``datasets.load_dataset`` reads, or a
    hub name."""
    hf_split: str | None = None
    """The split of ``hf_dataset`` (optional when it has exactly one)."""

    def __post_init__(self):
        if (self.path is None) == (self.hf_dataset is None):
            raise DataError("give either a data file or --hf-dataset (exactly one)")
        if self.path is not None and self.hf_split is not None:
            raise DataError(f"{self.path}: --hf-split applies to --hf-dataset only")

    def describe(self) -> str:
        """``data/sst2/dev.tsv`` or ``hf:PATH[split]``, for messages."""
        return self.path if self.path is not None else hf_label(self.hf_dataset, self.hf_split)


@dataclass(frozen=True)
class Record:
    """One input record."""

    where: str
    """``FILE:LINE`` (1-based), ``FILE#INDEX`` or ``hf:NAME[split]#ROW``."""
    fields: dict
    """Column -> value (``str`` for TSV/CSV; any JSON/``datasets`` value otherwise)."""


def field(record: Record, column: str, flag: str) -> object:
    """``record.fields[column]``, or a ``DataError`` naming the record, the column and its flag."""
    try:
        return record.fields[column]
    except KeyError:
        cols = ", ".join(map(str, record.fields))
        raise DataError(f"{record.where}: no column {column!r} ({flag}); columns: {cols}") from None


def read_records(source: RecordSource) -> Iterator[Record]:
    """Every record of ``source`` in file order, streamed."""
    if source.hf_dataset is not None:
        for where, row in iter_hf_rows(source.hf_dataset, source.hf_split):
            yield Record(where, row)
        return
    path = Path(source.path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown data format {path.suffix!r} (one of {', '.join(FORMATS)})"
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        yield from _READERS[fmt](path)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def _decode(raw: bytes, where: str, encoding: str = "utf-8") -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start})") from None


def _header(names: list[str], where: str) -> list[str]:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{where}: duplicate column name(s) {dup} in the header")
    return names


def _read_tsv(path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        first = f.readline()
        if not first.strip():
            raise DataError(f"{path}:1: empty header row (a .tsv starts with column names)")
        names = _decode(first, f"{path}:1", "utf-8-sig").rstrip("\r\n").split("\t")
        header = _header(names, f"{path}:1")
        for lineno, raw in enumerate(f, start=2):
            where = f"{path}:{lineno}"
            line = _decode(raw, where).rstrip("\n").removesuffix("\r")
            if not line:
                continue
            values = line.split("\t")
            if len(values) != len(header):
                raise DataError(
                    f"{where}: {len(values)} tab-separated field(s), the header has "
                    f"{len(header)} ({', '.join(header)})"
                )
            yield Record(where, dict(zip(header, values, strict=True)))


def _read_csv(path: Path) -> Iterator[Record]:
    csv.field_size_limit(sys.maxsize)
    with open(path, "rb") as fb:
        text = io.TextIOWrapper(fb, encoding="utf-8-sig", errors="strict", newline="")
        reader = csv.reader(text)
        header, start = None, 1
        try:
            for values in reader:
                where, start = f"{path}:{start}", reader.line_num + 1
                if not values:
                    continue  # an empty line
                if header is None:
                    header = _header(values, where)
                    continue
                if len(values) != len(header):
                    raise DataError(
                        f"{where}: {len(values)} comma-separated field(s), the header has "
                        f"{len(header)} ({', '.join(header)})"
                    )
                yield Record(where, dict(zip(header, values, strict=True)))
        except UnicodeDecodeError:
            raise DataError(f"{path}: invalid UTF-8 near line {reader.line_num + 1}") from None
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    if header is None:
        raise DataError(f"{path}: empty file (a .csv starts with a header row)")


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_jsonl(path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            value, err = parse_json_line(raw)
            if err is not None:
                raise DataError(f"{where}: {err}")
            yield Record(where, _object(value, where))


def _read_json(path: Path) -> Iterator[Record]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg == "Extra data":
            hint = "; a .json file holds one array (or {'data': [...]}): name JSON lines .jsonl"
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}){hint}") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of objects or {{'data': [...]}}")
    for i, rec in enumerate(value):
        yield Record(f"{path}#{i}", _object(rec, f"{path}#{i}"))


_READERS = {"tsv": _read_tsv, "csv": _read_csv, "jsonl": _read_jsonl, "json": _read_json}
