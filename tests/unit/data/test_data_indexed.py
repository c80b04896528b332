"""MMIDIDX reader/builder/merge against the Megatron-made fixture bytes."""

import shutil
import struct

import numpy as np
import pytest
from data_paths import MEGATRON_PREFIX

from mtnlg.data.errors import DataError
from mtnlg.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from mtnlg.data.merge import run as merge_main

FIX_BIN = MEGATRON_PREFIX.with_suffix(".bin").read_bytes()
FIX_IDX = MEGATRON_PREFIX.with_suffix(".idx").read_bytes()


def _fixture_docs() -> list[list[int]]:
    """Token lists parsed straight from the Megatron bytes (independent of our reader)."""
    n_seq, n_doc = struct.unpack("<QQ", FIX_IDX[18:34])
    sizes = np.frombuffer(FIX_IDX, np.int32, n_seq, 34)
    tokens = np.frombuffer(FIX_BIN, np.uint16)
    ends = np.cumsum(sizes)
    return [tokens[e - s : e].tolist() for s, e in zip(sizes, ends, strict=True)]


def test_reads_megatron_fixture():
    ds = MMapIndexedDataset(MEGATRON_PREFIX)
    assert len(ds) == 1000
    assert ds.dtype == np.uint16 and ds.sizes.dtype == np.int32
    assert ds[0][:5].tolist() == [32, 2153, 4994, 802, 1732]
    assert ds.doc_idx.tolist() == list(range(1001))
    docs = _fixture_docs()
    assert [ds[i].tolist() for i in range(0, 1000, 37)] == docs[::37]
    assert ds.get(3, 2, 4).tolist() == docs[3][2:6]
    assert ds.num_tokens == len(FIX_BIN) // 2


def test_builder_is_byte_identical_to_megatron(tmp_path):
    prefix = tmp_path / "out"
    with MMapIndexedDatasetBuilder(prefix, np.uint16) as b:
        for doc in _fixture_docs():
            b.add_document(doc)
    assert (tmp_path / "out.bin").read_bytes() == FIX_BIN
    assert (tmp_path / "out.idx").read_bytes() == FIX_IDX


def test_merge_halves_is_byte_identical(tmp_path):
    docs = _fixture_docs()
    for name, part in (("a", docs[:400]), ("b", docs[400:])):
        with MMapIndexedDatasetBuilder(tmp_path / name, np.uint16) as b:
            for doc in part:
                b.add_document(doc)
    merged = merge_main(
        [
            "--input",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--output-prefix",
            str(tmp_path / "ab"),
        ]
    )
    assert len(merged) == 1000
    assert (tmp_path / "ab.bin").read_bytes() == FIX_BIN
    assert (tmp_path / "ab.idx").read_bytes() == FIX_IDX


def test_merge_rejects_mixed_dtypes(tmp_path):
    with MMapIndexedDatasetBuilder(tmp_path / "wide", np.int32) as b:
        b.add_document([70000])
    with pytest.raises(SystemExit, match="dtype"):
        merge_main(
            [
                "--input",
                str(MEGATRON_PREFIX),
                str(tmp_path / "wide"),
                "--output-prefix",
                str(tmp_path / "m"),
            ]
        )
    assert not list(tmp_path.glob("m*"))


def test_int32_dataset_roundtrip(tmp_path):
    with MMapIndexedDatasetBuilder(tmp_path / "w", np.int32) as b:
        b.add_item([1, 2])
        b.add_item([70000])
        b.end_document()
        b.add_documents(np.array([5, 6, 7]), np.array([1, 2]))
    ds = MMapIndexedDataset(tmp_path / "w")
    assert ds.dtype == np.int32
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [70000], [5], [6, 7]]
    assert ds.doc_idx.tolist() == [0, 2, 3, 4]
    assert (tmp_path / "w.idx").read_bytes()[17] == 4  # dtype code int32


def test_token_id_too_large_for_dtype(tmp_path):
    with pytest.raises(DataError, match="70000 does not fit uint16"):
        with MMapIndexedDatasetBuilder(tmp_path / "x", np.uint16) as b:
            b.add_document([1, 2, 3])
            b.add_document([70000])
    assert not list(tmp_path.iterdir()), "no partial .bin/.idx (or temp file) left behind"


def _copy_fixture(tmp_path, idx_bytes=None, bin_bytes=None):
    (tmp_path / "d.idx").write_bytes(FIX_IDX if idx_bytes is None else idx_bytes)
    (tmp_path / "d.bin").write_bytes(FIX_BIN if bin_bytes is None else bin_bytes)
    return tmp_path / "d"


@pytest.mark.parametrize(
    "idx_bytes, message",
    [
        (FIX_IDX[:-8], "truncated or corrupt index"),
        (FIX_IDX[:20], "bad magic or truncated header"),
        (b"NOTANIDX" + FIX_IDX[8:], "not a Megatron MMIDIDX"),
        (FIX_IDX[:9] + struct.pack("<Q", 2) + FIX_IDX[17:], "version 2"),
        (FIX_IDX[:17] + b"\x63" + FIX_IDX[18:], "unknown dtype code 99"),
        (b"", "bad magic or truncated header"),
    ],
)
def test_bad_index_files(tmp_path, idx_bytes, message):
    prefix = _copy_fixture(tmp_path, idx_bytes=idx_bytes)
    with pytest.raises(DataError, match=message) as e:
        MMapIndexedDataset(prefix)
    assert "d.idx" in str(e.value)


def test_truncated_bin_and_missing_files(tmp_path):
    prefix = _copy_fixture(tmp_path, bin_bytes=FIX_BIN[:-2])
    with pytest.raises(DataError, match="d.bin: truncated"):
        MMapIndexedDataset(prefix)
    (tmp_path / "d.bin").unlink()
    with pytest.raises(DataError, match="missing data file"):
        MMapIndexedDataset(prefix)
    with pytest.raises(DataError, match="cannot read index file"):
        MMapIndexedDataset(tmp_path / "nothing")


def test_unreadable_index(tmp_path):
    prefix = _copy_fixture(tmp_path)
    (tmp_path / "d.idx").unlink()
    (tmp_path / "d.idx").mkdir()  # a directory cannot be read as a file, even by root
    with pytest.raises(DataError, match="cannot read index file"):
        MMapIndexedDataset(prefix)
    shutil.rmtree(tmp_path / "d.idx")
