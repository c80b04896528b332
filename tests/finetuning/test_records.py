"""Fine-tuning record readers: TSV/CSV/JSONL/JSON files and Hugging Face ``datasets`` input."""

import json
from pathlib import Path

import pytest

from mtnlg.finetuning.records import DataError, RecordSource, field, read_records

ROOT = Path(__file__).resolve().parents[2]
SST2_DEV = ROOT / "data" / "sst2" / "dev.tsv"
ROWS = [
    {"prompt": 'Say "hi", twice.', "response": "hi hi", "id": 0},
    {"prompt": "tabs\tand\nnewlines ünïcödé", "response": " spaced ", "id": 1},
    {"prompt": "3", "response": "three", "id": 2},
]


def _records(**kw):
    return list(read_records(RecordSource(**kw)))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "name,text,fields,lines",
    [  # TSV: no quote processing; CSV: quoted fields may span lines; the header is line 1
        (
            "d.tsv",
            'sentence\tlabel\n"quoted" it \'s \t1\n\nhalf " quote\t0\r\n',
            [
                {"sentence": '"quoted" it \'s ', "label": "1"},
                {"sentence": 'half " quote', "label": "0"},
            ],
            [2, 4],
        ),
        (
            "d.csv",
            'text,label\n"two\nlines, one field",pos\n\nplain,neg\n',
            [{"text": "two\nlines, one field", "label": "pos"}, {"text": "plain", "label": "neg"}],
            [2, 5],
        ),
    ],
)
def test_tsv_csv_fields_and_lines(tmp_path, name, text, fields, lines):
    src = tmp_path / name
    src.write_text(text)
    recs = _records(path=str(src))
    assert [r.fields for r in recs] == fields
    assert [r.where for r in recs] == [f"{src}:{n}" for n in lines]


def test_sst2_dev_matches_datasets_csv_reader():
    """Our TSV reader against datasets' (pandas) csv builder with quoting off, on real SST-2."""
    ours = _records(path=str(SST2_DEV))
    theirs = _records(hf_dataset=str(SST2_DEV))
    assert len(ours) == len(theirs) == 872
    assert ours[0].where == f"{SST2_DEV}:2" and theirs[0].where == f"hf:{SST2_DEV}[train]#0"
    assert [(r.fields["sentence"], int(r.fields["label"])) for r in ours] == [
        (r.fields["sentence"], r.fields["label"]) for r in theirs
    ]
    assert any('"' in r.fields["sentence"] or "'" in r.fields["sentence"] for r in ours)


def test_csv_via_datasets_keeps_text_verbatim(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text('text,label\nNA,pos\nnull,neg\n,pos\n"a, ""b""",neg\n')
    ours = [r.fields for r in _records(path=str(src))]
    assert ours[0] == {"text": "NA", "label": "pos"} and ours[2]["text"] == ""
    assert [r.fields for r in _records(hf_dataset=str(src))] == ours


def test_jsonl_and_json_layouts(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", ROWS)
    recs = _records(path=str(src))
    assert [r.fields for r in recs] == ROWS
    assert [r.where for r in recs] == [f"{src}:{i}" for i in (1, 2, 3)]
    for layout in (ROWS, {"data": ROWS}):
        (tmp_path / "d.json").write_text(json.dumps(layout))
        recs = _records(path=str(tmp_path / "d.json"))
        assert [r.fields for r in recs] == ROWS and recs[2].where == f"{tmp_path / 'd.json'}#2"


@pytest.mark.parametrize(
    "name,text,match",
    [
        ("bad.jsonl", '{"a": 1}\n\n{"a": 2,}\n', r"bad.jsonl:3: malformed JSON"),
        ("list.jsonl", '{"a": 1}\n[1, 2]\n', r"list.jsonl:2: expected a JSON object, got list"),
        ("lines.json", '{"a": 1}\n{"a": 2}\n', r"lines.json:2: malformed JSON.*name JSON lines"),
        ("utf.tsv", "a\tb\nx\t\udcff\n", r"utf.tsv:2: invalid UTF-8"),
        ("short.tsv", "a\tb\nok\t1\nno label\n", r"short.tsv:3: 1 tab-separated field\(s\), the h"),
        ("long.csv", "text,label\na,b,c\n", r"long.csv:2: 3 comma-separated field\(s\)"),
        ("empty.tsv", "", r"empty.tsv:1: empty header row"),
        ("dup.csv", "a,a\n1,2\n", r"dup.csv:1: duplicate column"),
        ("data.txt", "hello\n", r"data.txt: unknown data format '.txt'"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, name, text, match):
    src = tmp_path / name
    src.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    with pytest.raises(DataError, match=match):
        _records(path=str(src))


def test_field_names_column_flag_and_columns(tmp_path):
    rec = _records(path=str(_jsonl(tmp_path / "d.jsonl", ROWS[:1])))[0]
    assert field(rec, "prompt", "--prompt-key") == ROWS[0]["prompt"]
    with pytest.raises(DataError, match=r"d.jsonl:1: no column 'text' \(--text-key\); columns: pr"):
        field(rec, "text", "--text-key")
    with pytest.raises(DataError, match="exactly one"):
        RecordSource(path="a.tsv", hf_dataset="b")


@pytest.fixture(scope="module")
def hf_sources(tmp_path_factory):
    """The same rows as JSONL, as save_to_disk folders, and as files load_dataset reads."""
    from datasets import Dataset, DatasetDict

    tmp = tmp_path_factory.mktemp("hf")
    jsonl = _jsonl(tmp / "rows.jsonl", ROWS)
    ds = Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp / "single"))
    DatasetDict({"train": ds, "validation": ds.select([2, 0])}).save_to_disk(str(tmp / "dict"))
    folder = tmp / "files"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", ROWS)
    _jsonl(folder / "validation.jsonl", [ROWS[2], ROWS[0]])
    return tmp, jsonl


def test_hf_dataset_equals_jsonl(hf_sources):
    tmp, jsonl = hf_sources
    want = [r.fields for r in _records(path=str(jsonl))]
    cases = [
        (str(tmp / "single"), None, "single[train]"),
        (str(tmp / "single"), "train", "single[train]"),
        (str(tmp / "dict"), "train", "dict[train]"),
        (str(tmp / "files"), "train", "files[train]"),
        (str(jsonl), None, "rows.jsonl[train]"),
    ]
    for name, split, label in cases:
        recs = _records(hf_dataset=name, hf_split=split)
        assert [r.fields for r in recs] == want, name
        assert recs[1].where == f"hf:{tmp}/{label}#1"
    for name in (str(tmp / "dict"), str(tmp / "files")):
        valid = _records(hf_dataset=name, hf_split="validation")
        assert [r.fields for r in valid] == [want[2], want[0]]


def test_hf_dataset_errors(hf_sources):
    tmp, _ = hf_sources
    with pytest.raises(DataError, match=r"no split 'test' \(--hf-split\); has \['train', 'valid"):
        _records(hf_dataset=str(tmp / "dict"), hf_split="test")
    with pytest.raises(DataError, match=r"choose a split with --hf-split"):
        _records(hf_dataset=str(tmp / "dict"))
    with pytest.raises(
        DataError, match=r"single: no split 'validation' \(--hf-split\); has \['train'\]"
    ):
        _records(hf_dataset=str(tmp / "single"), hf_split="validation")
    with pytest.raises(DataError, match=r"--hf-dataset .*missing: cannot open"):
        _records(hf_dataset=str(tmp / "missing"))
    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(
        DataError, match=r"hf:.*bad.jsonl\[train\]: cannot read after 0 rows: .*row 1"
    ):
        _records(hf_dataset=str(bad))


def test_classification_tokens_are_transformers_on_the_raw_text(tmp_path):
    """Training/dev records and ``--predict`` inputs (records and .txt lines) are tokenized as
    they are, surrounding whitespace included: the ids ``transformers`` gives the same text.
    SST-2's dev sentences end in a space, which is a token."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from mtnlg.data.tokenizer import build_tokenizer
    from mtnlg.finetuning.classification import ColumnSpec, read_examples
    from mtnlg.finetuning.predict import read_inputs
    from tests.checkpoint.hf5_folders import save_hf5_tokenizer
    from tests.e2e.conftest import TINY_MERGES, TINY_VOCAB

    ours = build_tokenizer("GPT2BPETokenizer", TINY_VOCAB, TINY_MERGES)
    save_hf5_tokenizer(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[:6]
    texts = [line.split("\t")[0] for line in lines[1:]] + ["  padded both sides  "]
    assert all(t.endswith(" ") for t in texts)
    want = [hf(t, add_special_tokens=False)["input_ids"] for t in texts]
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("\n".join([*lines, "  padded both sides  \t1"]) + "\n", encoding="utf-8")
    got = read_examples(RecordSource(path=str(tsv)), ours, 512, ColumnSpec(), ["0", "1"], False)
    assert [e.ids for e in got] == want
    txt = tmp_path / "inputs.txt"
    txt.write_text("".join(t + "\r\n" for t in texts), encoding="utf-8")  # CRLF line ends too
    args = SimpleNamespace(predict=str(txt), truncate=False)
    assert [e.ids for e in read_inputs(args, ours, 512)] == want
