"""Megatron's LAMBADA context/target split on real passages (real GPT-2 BPE), and bad files."""

from __future__ import annotations

import json

import pytest

from mtnlg.data.tokenizer import GPT2BPETokenizer
from mtnlg.evaluation.lambada import LambadaDataError, lambada_examples, read_lambada
from tests.inference.gen_helpers import ROOT

LAMBADA = ROOT / "data" / "lambada" / "lambada_test.jsonl"


@pytest.fixture(scope="module")
def tok():
    d = ROOT / "data" / "gpt2"
    return GPT2BPETokenizer(d / "gpt2-vocab.json", d / "gpt2-merges.txt")


@pytest.fixture(scope="module")
def texts():
    return [json.loads(line)["text"] for line in LAMBADA.read_text().splitlines()[:6]]


def test_real_file_has_every_passage():
    assert len(read_lambada(LAMBADA)) == 5153  # OpenAI's LAMBADA test set


# (line, context ends with, last word): read by hand from the file
STRICT = [
    (1, "his mouth curved in a confident grin, I don't care about", "signs"),
    (2, '"I can make it there on my own,', "Shane"),  # "Shane" also earlier: the last one
    (6, "“You don’t mean anything to me anymore,", "Hastin"),
]


@pytest.mark.parametrize(("line", "context_end", "word"), STRICT)
def test_strict_split_is_the_last_word(tok, texts, tmp_path, line, context_end, word):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": texts[line - 1]}) + "\n")
    (ex,) = lambada_examples(path, tok, strict=True)
    context = tok.detokenize(ex.context)
    assert context.endswith(context_end)
    assert context == context.strip()  # text[:rfind(word)].strip()
    assert tok.detokenize(ex.target) == " " + word
    assert ex.target == tok.tokenize(" " + word)


@pytest.mark.parametrize("line", [1, 2, 6])
def test_non_strict_split_is_the_last_token(tok, texts, tmp_path, line):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": texts[line - 1]}) + "\n")
    (ex,) = lambada_examples(path, tok, strict=False)
    (strict,) = lambada_examples(path, tok, strict=True)
    assert len(ex.target) == 1
    assert tok.detokenize(ex.context + ex.target) == texts[line - 1]
    assert tok.detokenize(ex.target) == tok.detokenize(strict.target[-1:])  # the word's end


def test_limit_takes_the_first_examples(tok):
    examples = lambada_examples(LAMBADA, tok, strict=False, limit=3)
    assert len(examples) == 3


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ('{"text": "a b c"}\n{"text": "oops"\n', "bad.jsonl:2: not JSON"),
        ('{"text": "a b c"}\n\n{"passage": "x"}\n', "bad.jsonl:3: needs a non-empty"),
        ('{"text": "   "}\n', "bad.jsonl:1: needs a non-empty"),
        ("", "bad.jsonl: no examples"),
        ('\n{"text": "lonely"}\n', "bad.jsonl:2: empty context or target"),
    ],
)
def test_bad_file_names_file_and_line(tok, tmp_path, content, where):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(LambadaDataError, match=where):
        lambada_examples(path, tok, strict=True)
