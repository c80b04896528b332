"""GPT samples, splits, caching, resuming and blending on the Megatron-made fixture."""

import numpy as np
import pytest
from data_paths import MEGATRON_PREFIX

from mtnlg.data.blending import BlendedDataset, blending_indices, parse_data_path
from mtnlg.data.errors import DataError
from mtnlg.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets, split_boundaries
from mtnlg.data.indexed_dataset import MMapIndexedDataset

PREFIX = str(MEGATRON_PREFIX)
SEQ = 64


@pytest.fixture(scope="module")
def indexed():
    return MMapIndexedDataset(MEGATRON_PREFIX)


def _docs_stream(indexed, doc_order) -> np.ndarray:
    return np.concatenate([np.asarray(indexed[int(d)], dtype=np.int64) for d in doc_order])


def test_samples_are_windows_of_shuffled_documents(tmp_path, indexed):
    docs = np.arange(100, 200, dtype=np.int32)
    n = 5000  # several epochs of these 100 documents
    ds = GPTDataset("train", indexed, docs, n, SEQ, seed=7, cache_dir=tmp_path)
    epoch_tokens = int(indexed.sizes[docs].sum())
    epochs = len(ds.doc_idx) // len(docs)
    assert epochs * epoch_tokens >= n * SEQ + 1 > (epochs - 1) * epoch_tokens
    # every document once per epoch (Megatron shuffles the epochs together)
    assert sorted(ds.doc_idx) == sorted(list(range(100, 200)) * epochs)
    assert list(ds.doc_idx) != sorted(ds.doc_idx)
    stream = _docs_stream(indexed, ds.doc_idx)
    seen = set()
    for idx in range(0, n, 97):
        sample = ds[idx]["text"]
        assert sample.dtype == np.int64 and sample.shape == (SEQ + 1,)
        j = int(ds.shuffle_idx[idx])  # the j-th window of the shuffled-document stream
        np.testing.assert_array_equal(sample, stream[j * SEQ : (j + 1) * SEQ + 1])
        seen.add(j)
    assert len(seen) == len(range(0, n, 97))
    with pytest.raises(IndexError):
        ds[n]


def test_last_epoch_shuffled_separately_when_barely_used(tmp_path, indexed):
    docs = np.arange(100, dtype=np.int32)
    tokens = int(indexed.sizes[docs].sum())
    n = int(tokens * 1.1) // SEQ  # 2 epochs, the second one 10 % used
    ds = GPTDataset("train", indexed, docs, n, SEQ, seed=4, cache_dir=tmp_path)
    assert len(ds.doc_idx) == 200
    assert sorted(ds.doc_idx[:100]) == sorted(ds.doc_idx[100:]) == list(range(100))
    from_first = (tokens - 1) // SEQ  # samples lying wholly in the first epoch
    assert sorted(ds.shuffle_idx[:from_first]) == list(range(from_first))


def test_same_seed_same_samples_other_seed_differs(tmp_path, indexed):
    docs = np.arange(1000, dtype=np.int32)
    a = GPTDataset("train", indexed, docs, 300, SEQ, seed=1, cache_dir=tmp_path / "a")
    b = GPTDataset("train", indexed, docs, 300, SEQ, seed=1, cache_dir=tmp_path / "b")
    c = GPTDataset("train", indexed, docs, 300, SEQ, seed=2, cache_dir=tmp_path / "c")
    sa, sb, sc = ([d[i]["text"] for i in range(300)] for d in (a, b, c))
    assert all((x == y).all() for x, y in zip(sa, sb, strict=True))
    assert sum((x == y).all() for x, y in zip(sa, sc, strict=True)) < 5


def test_index_cache_written_atomically_and_reused(tmp_path, indexed):
    docs = np.arange(50, dtype=np.int32)
    a = GPTDataset("train", indexed, docs, 200, SEQ, seed=3, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and all(f.endswith(".npy") for f in files)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    b = GPTDataset("train", indexed, docs, 200, SEQ, seed=3, cache_dir=tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps  # reused, not rebuilt
    assert isinstance(b.shuffle_idx, np.memmap)
    assert all((a[i]["text"] == b[i]["text"]).all() for i in range(0, 200, 13))
    GPTDataset("train", indexed, docs, 200, SEQ + 1, seed=3, cache_dir=tmp_path)
    GPTDataset("train", indexed, docs[:-1], 200, SEQ, seed=3, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 9  # other parameters, other files
    assert not list(tmp_path.glob("*.tmp"))


def test_default_cache_dir_is_next_to_data(tmp_path, indexed):
    import shutil

    for ext in (".bin", ".idx"):
        shutil.copyfile(MEGATRON_PREFIX.with_suffix(ext), tmp_path / f"d{ext}")
    GPTDataset("valid", MMapIndexedDataset(tmp_path / "d"), np.arange(10), 20, SEQ, seed=0)
    assert len(list(tmp_path.glob("d_valid_indexmap_*.npy"))) == 3


def test_resume_mid_epoch_gives_the_exact_next_samples(tmp_path):
    nums = (400, 20, 5)
    first = build_train_valid_test_datasets([PREFIX], "969,30,1", SEQ, 11, nums, tmp_path / "a")
    # a fresh process (new cache dir: rebuilt from scratch) resuming after 123 consumed samples
    again = build_train_valid_test_datasets([PREFIX], "969,30,1", SEQ, 11, nums, tmp_path / "b")
    for k in range(123, 140):
        assert (first[0][k]["text"] == again[0][k]["text"]).all()


def test_split_by_documents(tmp_path, indexed):
    assert split_boundaries("969,30,1", 1000) == [0, 969, 999, 1000]
    assert split_boundaries("98,2,0", 1000) == [0, 980, 1000, 1000]
    assert split_boundaries("1", 10) == [0, 10, 10, 10]
    train, valid, test = build_train_valid_test_datasets(
        [PREFIX], "969,30,1", SEQ, 5, (100, 10, 3), cache_dir=tmp_path
    )
    assert set(np.unique(train.doc_idx)) == set(range(969))
    assert set(np.unique(valid.doc_idx)) == set(range(969, 999))
    assert set(np.unique(test.doc_idx)) == {999}
    assert (len(train), len(valid), len(test)) == (100, 10, 3)
    none = build_train_valid_test_datasets([PREFIX], "98,2,0", SEQ, 5, (10, 0, 3), tmp_path)
    assert none[0] is not None and none[1] is None and none[2] is None
    with pytest.raises(DataError, match="--split"):
        split_boundaries("a,b", 10)


def test_blending_weights_hold_within_1_percent(tmp_path):
    n = 10_000
    data_path = ["0.3", PREFIX, "0.7", PREFIX]
    train, _, _ = build_train_valid_test_datasets(
        data_path, "969,30,1", SEQ, 9, (n, 0, 0), tmp_path
    )
    assert isinstance(train, BlendedDataset) and len(train) == n
    counts = np.bincount(train.dataset_index, minlength=2)
    assert abs(counts[0] / n - 0.3) < 0.01 and abs(counts[1] / n - 0.7) < 0.01
    # every window, not only the whole run
    for start, size in ((0, 100), (1234, 1000), (5000, 5000), (9900, 100)):
        frac = np.mean(train.dataset_index[start : start + size] == 0)
        assert abs(frac - 0.3) <= 2 / size
    sample = train[17]["text"]
    d, s = train.dataset_index[17], train.dataset_sample_index[17]
    assert (sample == train.datasets[d][s]["text"]).all()


def test_blending_indices_three_way():
    w = [0.5, 0.2, 0.3]
    own, rank = blending_indices(w, 20_000)
    for d in range(3):
        picks = rank[own == d]
        np.testing.assert_array_equal(picks, np.arange(len(picks)))  # each set used in order
        running = np.cumsum(own == d)
        assert np.max(np.abs(running - w[d] * np.arange(1, 20_001))) <= 2


def test_parse_data_path_errors():
    assert parse_data_path(["p"]) == [(1.0, "p")]
    assert parse_data_path(["1", "a", "3", "b"]) == [(0.25, "a"), (0.75, "b")]
    with pytest.raises(DataError, match="pairs"):
        parse_data_path(["0.3", "a", "0.7"])
    with pytest.raises(DataError, match="not a number"):
        parse_data_path(["x", "a", "0.7", "b"])
    with pytest.raises(DataError, match=">= 0"):
        parse_data_path(["-1", "a", "2", "b"])
