"""``preprocess --hf-dataset``: byte-identical output to the same records given as JSON lines."""

import json

import pytest
from data_paths import TINY_MERGES, TINY_VOCAB

from mtnlg.data.preprocess import run

ROWS = [
    {"text": "First Citizen:\nBefore we proceed any further, hear me speak.", "title": "a"},
    {"text": "", "title": "empty text: skipped like in JSON lines"},
    {"text": 'All:\nSpeak, "speak". ünïcödé 🙂', "title": "c"},
    {"text": "  leading spaces and a tail \n", "title": "d"},
]


TOKENIZER = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(TINY_VOCAB),
             "--merge-file", str(TINY_MERGES)]  # fmt: skip


def _run(prefix, *src):
    """Both keys, EOD appended, 2 encoding threads."""
    out = ["--output-prefix", str(prefix), "--append-eod", "--json-keys", "text", "title"]
    return run([*src, *out, *TOKENIZER, "--workers", "2", "--log-interval", "0"])


def _bytes(prefix, key):
    return [
        (prefix.parent / f"{prefix.name}_{key}_document{ext}").read_bytes()
        for ext in (".bin", ".idx")
    ]


def test_hf_dataset_output_is_byte_identical_to_jsonl(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = ROWS * 50  # several encoding batches
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _run(tmp_path / "ref", "--input", str(jsonl))
    ds = Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "single"))
    DatasetDict({"train": ds.select([0]), "test": ds}).save_to_disk(str(tmp_path / "dict"))
    files = tmp_path / "files"
    files.mkdir()
    (files / "data.jsonl").write_text(jsonl.read_text())
    sources = {
        "single": ["--hf-dataset", str(tmp_path / "single")],
        "dict": ["--hf-dataset", str(tmp_path / "dict"), "--hf-split", "test"],
        "files": ["--hf-dataset", str(files), "--hf-split", "train"],
        "file": ["--hf-dataset", str(jsonl)],
    }
    for name, src in sources.items():
        stats = _run(tmp_path / name, *src)
        assert stats.documents == 150 and stats.empty_documents == 50, name
        for key in ("text", "title"):
            assert _bytes(tmp_path / name, key) == _bytes(tmp_path / "ref", key), (name, key)


def test_hf_dataset_errors_name_the_flag_and_row(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"text": "a"}, {"body": "b"}]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(SystemExit, match=r"hf:.*ds\[train\]#0: missing key 'title'"):
        _run(tmp_path / "out", "--hf-dataset", str(tmp_path / "ds"))
    assert not list(tmp_path.glob("out_*"))  # nothing half-written
    with pytest.raises(SystemExit, match=r"--hf-dataset .*nowhere: cannot open"):
        _run(tmp_path / "out", "--hf-dataset", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match=r"--hf-split needs --hf-dataset"):
        _run(tmp_path / "out", "--input", str(tmp_path / "x.jsonl"), "--hf-split", "train")
