"""Preprocessing end to end: formats, Megatron byte parity, workers, and every bad input."""

import csv
import gzip
import json

import numpy as np
import pytest
from data_paths import MEGATRON_PREFIX, TINY_MERGES, TINY_VOCAB

from mtnlg.data.indexed_dataset import MMapIndexedDataset
from mtnlg.data.preprocess import main, run

DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak. ünïcödé 🙂",
    "  leading spaces and a tail \n",
]


def _run(tmp_path, inputs, *extra, prefix="out"):
    args = [
        "--input",
        *map(str, inputs),
        "--output-prefix",
        str(tmp_path / prefix),
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--vocab-file",
        str(TINY_VOCAB),
        "--merge-file",
        str(TINY_MERGES),
        "--log-interval",
        "1",
        *extra,
    ]
    return run(args)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _decode_all(tok, prefix):
    ds = MMapIndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_jsonl_roundtrip_with_eod(tmp_path, tiny_tok):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": i} for i, t in enumerate(DOCS)])
    stats = _run(tmp_path, [src], "--append-eod", "--workers", "1")
    docs = _decode_all(tiny_tok, tmp_path / "out_text_document")
    assert stats.documents == 3 and stats.outputs == [str(tmp_path / "out_text_document")]
    assert [d[-1] for d in docs] == [tiny_tok.eod] * 3
    assert [tiny_tok.detokenize(d[:-1]) for d in docs] == DOCS
    without = _run(tmp_path, [src], prefix="noeod")
    assert [
        tiny_tok.detokenize(d) for d in _decode_all(tiny_tok, tmp_path / "noeod_text_document")
    ] == DOCS
    assert without.tokens == stats.tokens - 3


def test_reproduces_megatron_preprocess_bytes(tmp_path, tiny_tok):
    """Texts of the Megatron-made fixture -> our preprocess -> the very same .bin/.idx bytes."""
    ref = MMapIndexedDataset(MEGATRON_PREFIX)
    texts = [tiny_tok.detokenize(ref[i][:-1]) for i in range(len(ref))]
    src = _write_jsonl(tmp_path / "owt.jsonl", [{"text": t} for t in texts])
    _run(tmp_path, [src], "--append-eod", "--workers", "2", prefix="owt")
    for ext in (".bin", ".idx"):
        ours = (tmp_path / f"owt_text_document{ext}").read_bytes()
        assert ours == MEGATRON_PREFIX.with_suffix(ext).read_bytes()


def test_same_output_for_1_and_2_workers(tmp_path):
    src = _write_jsonl(
        tmp_path / "in.jsonl", [{"text": f"{DOCS[i % 3]} #{i} " * (i % 7 + 1)} for i in range(300)]
    )
    for w in ("1", "2"):
        _run(tmp_path, [src], "--append-eod", "--workers", w, prefix=f"w{w}")
    # tiny batches so that 2 workers really interleave
    from mtnlg.data.preprocess import PreprocessConfig, preprocess
    from mtnlg.data.tokenizer import build_tokenizer

    tok = build_tokenizer("GPT2BPETokenizer", TINY_VOCAB, TINY_MERGES)
    preprocess(
        PreprocessConfig(
            [str(src)], str(tmp_path / "small"), tok, append_eod=True, workers=2, batch_bytes=500
        )
    )
    for ext in (".bin", ".idx"):
        one = (tmp_path / f"w1_text_document{ext}").read_bytes()
        assert one == (tmp_path / f"w2_text_document{ext}").read_bytes()
        assert one == (tmp_path / f"small_text_document{ext}").read_bytes()


def test_input_formats(tmp_path, tiny_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"text": t} for t in DOCS]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (tmp_path / "b.json").write_text(json.dumps(records))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "c.parquet")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["text"])
        w.writeheader()
        w.writerows(records)
    (tmp_path / "e.txt").write_text("one line\nanother line\n")
    stats = _run(
        tmp_path,
        [tmp_path / "a.jsonl.gz", tmp_path / "b.json", tmp_path / "[cd].*", tmp_path / "e.txt"],
    )
    got = [tiny_tok.detokenize(d) for d in _decode_all(tiny_tok, tmp_path / "out_text_document")]
    assert got == DOCS * 4 + ["one line", "another line"]
    assert stats.documents == 14


def test_multiple_json_keys(tmp_path, tiny_tok):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"q": "a question", "a": "an answer"}] * 2)
    _run(tmp_path, [src], "--json-keys", "q", "a")
    for key, text in (("q", "a question"), ("a", "an answer")):
        docs = _decode_all(tiny_tok, tmp_path / f"out_{key}_document")
        assert [tiny_tok.detokenize(d) for d in docs] == [text, text]


def _assert_no_output(tmp_path):
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("out")]
    assert left == [], f"partial output left behind: {left}"


def test_malformed_json_names_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": oops}\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:3: malformed JSON"):
        _run(tmp_path, [src])
    _assert_no_output(tmp_path)


def test_skip_bad_lines_counts_them(tmp_path, tiny_tok, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(
        b'{"text": "good"}\n{"text": oops}\n{"other": "x"}\n'
        b'{"text": "\xff\xfe bad utf8"}\n[1, 2]\n{"text": "also good"}\n'
    )
    stats = _run(tmp_path, [src], "--skip-bad-lines")
    assert stats.bad_lines == 4 and stats.documents == 2
    docs = _decode_all(tiny_tok, tmp_path / "out_text_document")
    assert [tiny_tok.detokenize(d) for d in docs] == ["good", "also good"]
    err = capsys.readouterr().err
    assert "4 bad lines" in err and "bad.jsonl:2" in err


def test_missing_key(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": "ok"}, {"body": "no text key"}])
    with pytest.raises(SystemExit, match=r"in\.jsonl:2: missing key 'text'"):
        _run(tmp_path, [src])
    _assert_no_output(tmp_path)
    with pytest.raises(SystemExit, match=r"c\.parquet: missing column"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
        _run(tmp_path, [tmp_path / "c.parquet"])


def test_invalid_utf8(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(SystemExit, match=r"in\.jsonl:2: invalid UTF-8"):
        _run(tmp_path, [src])
    _assert_no_output(tmp_path)


def test_empty_documents_skipped_and_counted(tmp_path, tiny_tok):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": ""}, {"text": "words"}, {"text": ""}])
    stats = _run(tmp_path, [src], "--append-eod")
    assert stats.empty_documents == 2 and stats.documents == 1
    docs = _decode_all(tiny_tok, tmp_path / "out_text_document")
    assert docs == [tiny_tok.tokenize("words") + [tiny_tok.eod]]


def test_token_id_that_does_not_fit(tmp_path, monkeypatch, tiny_tok):
    """A tokenizer that claims a small vocabulary but emits a large id: clear error, no files."""
    from mtnlg.data import tokenizer as tokenizer_mod

    monkeypatch.setattr(
        tokenizer_mod._HFBacked, "tokenize_batch", lambda self, texts: [[1, 70000] for _ in texts]
    )
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    with pytest.raises(SystemExit, match="70000 does not fit uint16"):
        _run(tmp_path, [src])
    _assert_no_output(tmp_path)


def test_cli_errors_and_help(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--append-eod" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--input .*missing.jsonl: no such file"):
        _run(tmp_path, [tmp_path / "missing.jsonl"])
    with pytest.raises(SystemExit, match="--workers must be >= 1"):
        _run(tmp_path, [_write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])], "--workers", "0")
    _assert_no_output(tmp_path)


def test_uint16_vs_int32_choice(tmp_path):
    from mtnlg.data.indexed_dataset import best_fitting_dtype

    assert best_fitting_dtype(50257) is np.uint16
    assert best_fitting_dtype(65500) is np.int32
    assert best_fitting_dtype(128000) is np.int32
