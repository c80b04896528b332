"""Megatron's ``MMIDIDX`` version-1 indexed dataset: an mmap reader, an atomic builder, a merge.

A dataset is a pair ``{prefix}.bin`` (all token ids back to back, one dtype) and ``{prefix}.idx``:

    offset  bytes  field
    0       9      magic  b"MMIDIDX\\x00\\x00"
    9       8      <Q version = 1
    17      1      <B dtype code (DTYPE_CODES)
    18      8      <Q number of sequences N
    26      8      <Q number of doc_idx entries D (documents + 1)
    34      4N     int32 sizes      (tokens per sequence)
    ...     8N     int64 pointers   (byte offset of each sequence in .bin)
    ...     8D     int64 doc_idx    (first sequence of each document, then N)

Without sentence splitting every document is one sequence, so ``doc_idx == arange(N + 1)``.
"""

from __future__ import annotations

import array
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from mtnlg.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34
# Megatron core's DType codes (older Megatron mapped 6 and 7 both to float64).
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def best_fitting_dtype(vocab_size: int | None) -> type:
    """Megatron's rule: uint16 when ``vocab_size < 65500``, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def data_file_path(prefix: str | Path) -> str:
    return f"{prefix}.bin"


def index_file_path(prefix: str | Path) -> str:
    return f"{prefix}.idx"


def _read_index(path: str) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray, np.memmap]:
    """Parse and validate an ``.idx`` file; returns (dtype, sizes, pointers, doc_idx, mmap)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"cannot read index file {path}: {e}") from e
    if len(header) < HEADER_BYTES or header[:9] != MAGIC:
        raise DataError(f"{path}: not a Megatron MMIDIDX index (bad magic or truncated header)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[9:])
    if version != VERSION:
        raise DataError(f"{path}: unsupported MMIDIDX version {version} (expected 1)")
    if code not in DTYPE_CODES:
        raise DataError(f"{path}: unknown dtype code {code}")
    expected = HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if size != expected:
        raise DataError(
            f"{path}: truncated or corrupt index: {size} bytes, header implies {expected} "
            f"({n_seq} sequences, {n_doc} doc_idx entries)"
        )
    mm = np.memmap(path, mode="r", order="C")
    sizes = np.frombuffer(mm, np.int32, n_seq, HEADER_BYTES)
    pointers = np.frombuffer(mm, np.int64, n_seq, HEADER_BYTES + 4 * n_seq)
    doc_idx = np.frombuffer(mm, np.int64, n_doc, HEADER_BYTES + 12 * n_seq)
    return np.dtype(DTYPE_CODES[code]), sizes, pointers, doc_idx, mm


class MMapIndexedDataset:
    """Read-only mmap view of ``{prefix}.bin/.idx`` (ours or Megatron-made).

    ``ds[i]`` is sequence ``i`` as a numpy array of ``ds.dtype`` (a zero-copy view);
    ``ds.get(i, offset, length)`` slices inside it.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        self.dtype, self.sizes, self.pointers, self.doc_idx, self._idx_mm = _read_index(idx_path)
        if not os.path.isfile(bin_path):
            raise DataError(f"missing data file {bin_path} for index {idx_path}")
        bin_bytes = os.path.getsize(bin_path)
        need = 0
        if len(self.sizes):
            need = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize
        if bin_bytes < need:
            raise DataError(f"{bin_path}: truncated: {bin_bytes} bytes, index needs {need}")
        if len(self.doc_idx) == 0 or self.doc_idx[-1] != len(self.sizes):
            raise DataError(f"{idx_path}: doc_idx must end with the number of sequences")
        # np.memmap cannot map an empty file.
        self._bin = np.memmap(bin_path, mode="r") if bin_bytes else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        i = int(i) % len(self)
        return np.frombuffer(self._bin, self.dtype, int(self.sizes[i]), int(self.pointers[i]))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (to its end if length is None)."""
        size = int(self.sizes[i])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"slice [{offset}, {offset + length}) outside sequence {i} ({size})")
        ptr = int(self.pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, ptr)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))


class MMapIndexedDatasetBuilder:
    """Writes ``{prefix}.bin/.idx`` under temp names and renames them only in ``finalize()``.

    Use as a context manager: on an exception nothing is left behind.
    """

    def __init__(self, prefix: str | Path, dtype: type = np.uint16):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise DataError(f"unsupported token dtype {self.dtype}")
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self._tmp_bin = data_file_path(prefix) + tag
        self._tmp_idx = index_file_path(prefix) + tag
        self._bin = open(self._tmp_bin, "wb")
        self._sizes = array.array("q")  # tokens per sequence
        self._doc_idx = array.array("q", [0])  # first sequence of each document

    def _check_range(self, arr: np.ndarray) -> None:
        if arr.size and self._info is not None:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                raise DataError(
                    f"token id {hi if hi > self._info.max else lo} does not fit {self.dtype} "
                    f"(range {self._info.min}..{self._info.max}); use a wider dtype"
                )

    def add_item(self, tokens) -> None:
        """Append one sequence (list or array of ids); checks every id fits ``dtype``."""
        arr = np.asarray(tokens)
        self._check_range(arr)
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.append(arr.size)

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append many one-sequence documents: ``flat`` holds their ids back to back [T],
        ``lengths`` [docs] their sizes (sum == T)."""
        flat, lengths = np.asarray(flat), np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())}, flat has {flat.size} ids")
        self._check_range(flat)
        self._bin.write(flat.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.frombytes(lengths.tobytes())
        first = len(self._sizes) - len(lengths)
        self._doc_idx.frombytes(
            np.arange(first + 1, len(self._sizes) + 1, dtype=np.int64).tobytes()
        )

    def end_document(self) -> None:
        """Close the current document (all sequences added since the last call)."""
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens) -> None:
        """One sequence that is a whole document."""
        self.add_item(tokens)
        self.end_document()

    def merge_file_(self, prefix: str | Path) -> None:
        """Append every sequence and document of an existing dataset (same dtype)."""
        idx_dtype, sizes, _, doc_idx, _ = _read_index(index_file_path(prefix))
        if idx_dtype != self.dtype:
            raise DataError(f"{prefix}: dtype {idx_dtype} differs from output dtype {self.dtype}")
        offset = len(self._sizes)
        self._sizes.frombytes(sizes.astype(np.int64).tobytes())
        self._doc_idx.frombytes((offset + doc_idx[1:]).astype(np.int64).tobytes())
        with open(data_file_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, 16 << 20)

    def finalize(self) -> None:
        """Write the index and move both files to their final names (index last)."""
        self._bin.close()
        sizes = np.asarray(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        doc_idx = np.asarray(self._doc_idx, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<QBQQ", VERSION, CODE_OF[self.dtype], len(sizes), len(doc_idx)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
        os.replace(self._tmp_bin, data_file_path(self.prefix))
        os.replace(self._tmp_idx, index_file_path(self.prefix))

    def abort(self) -> None:
        """Drop the temp files; the final names are never touched."""
        self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self) -> MMapIndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def merge_datasets(prefixes: list[str], output_prefix: str) -> MMapIndexedDataset:
    """Join several datasets (same dtype) into ``output_prefix``, in the given order."""
    if not prefixes:
        raise DataError("--input: need at least one dataset prefix to merge")
    dtypes = {p: MMapIndexedDataset(p).dtype for p in prefixes}  # validates every input
    with MMapIndexedDatasetBuilder(output_prefix, dtype=dtypes[prefixes[0]]) as builder:
        for p in prefixes:
            builder.merge_file_(p)
    return MMapIndexedDataset(output_prefix)
