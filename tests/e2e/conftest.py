import pytest

from mtnlg.data.preprocess import run as preprocess

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
TINY_VOCAB = ROOT / "data" / "gpt2-tiny" / "gpt2-tiny-vocab.json"
TINY_MERGES = ROOT / "data" / "gpt2-tiny" / "gpt2-tiny-merges.txt"


@pytest.fixture(scope="session")
def demo_prefix(tmp_path_factory) -> str:
    """The demo corpus preprocessed with the tiny GPT-2 vocabulary (fast to train on)."""
    out = tmp_path_factory.mktemp("data") / "shk"
    preprocess(
        [
            "--input",
            str(ROOT / "data" / "demo" / "shakespeare.jsonl"),
            "--output-prefix",
            str(out),
            "--tokenizer-type",
            "GPT2BPETokenizer",
            "--vocab-file",
            str(TINY_VOCAB),
            "--merge-file",
            str(TINY_MERGES),
            "--append-eod",
            "--workers",
            "1",
        ]
    )
    return str(out) + "_text_document"
