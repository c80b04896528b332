"""Tokenizers against independent references: known GPT-2 ids, transformers, sentencepiece."""

import json
import shutil

import numpy as np
import pytest
from data_paths import DEMO_JSONL, GPT2_MERGES, GPT2_VOCAB, MEGATRON_PREFIX, TINY_MERGES, TINY_VOCAB

from mtnlg.data.errors import DataError
from mtnlg.data.indexed_dataset import MMapIndexedDataset
from mtnlg.data.tokenizer import build_tokenizer, load_tokenizer


def _demo_texts(n=40):
    with open(DEMO_JSONL) as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def test_gpt2_real_ids(gpt2_tok):
    assert gpt2_tok.tokenize("Hello world") == [15496, 995]
    assert gpt2_tok.eod == 50256
    assert gpt2_tok.vocab_size == 50257
    assert gpt2_tok.detokenize([15496, 995]) == "Hello world"


def test_gpt2_matches_transformers(tmp_path, gpt2_tok):
    from transformers import GPT2TokenizerFast

    shutil.copyfile(GPT2_VOCAB, tmp_path / "vocab.json")
    shutil.copyfile(GPT2_MERGES, tmp_path / "merges.txt")
    ref = GPT2TokenizerFast.from_pretrained(str(tmp_path))
    assert len(ref) == gpt2_tok.vocab_size
    texts = _demo_texts() + ["  leading spaces\n\ttabs ünïcödé 🙂 and 'quotes' 1234567"]
    assert gpt2_tok.tokenize_batch(texts) == [ref.encode(t) for t in texts]
    for t in texts:
        assert gpt2_tok.detokenize(gpt2_tok.tokenize(t)) == t


def test_gpt2_tiny_reproduces_megatron_python_bpe(tiny_tok):
    """Megatron's own (pure-Python) GPT-2 BPE made the fixture: decode + re-encode every doc."""
    ds = MMapIndexedDataset(MEGATRON_PREFIX)
    assert tiny_tok.vocab_size == 5000 and tiny_tok.eod == 4999
    docs = [ds[i].tolist() for i in range(len(ds))]
    assert all(d[-1] == tiny_tok.eod for d in docs)
    texts = [tiny_tok.detokenize(d[:-1]) for d in docs]
    assert tiny_tok.tokenize_batch(texts) == [d[:-1] for d in docs]


def test_save_and_reload(tmp_path, gpt2_tok):
    from transformers import PreTrainedTokenizerFast

    gpt2_tok.save(tmp_path / "tok")
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "tok").iterdir()
    }
    again = load_tokenizer(tmp_path / "tok")
    text = _demo_texts(3)[2]
    assert again.tokenize(text) == gpt2_tok.tokenize(text)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok/tokenizer.json"))
    assert hf.encode(text) == gpt2_tok.tokenize(text)
    assert hf.convert_tokens_to_ids("<|endoftext|>") == 50256
    assert gpt2_tok.files["tokenizer_type"] == "GPT2BPETokenizer"


def test_train_tokenizer_cli_and_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer

    from mtnlg.data.train_tokenizer import run as main

    out = main(["--input", str(DEMO_JSONL), "--vocab-size", "600", "--output-dir", str(tmp_path)])
    tok = build_tokenizer("HFTokenizer", tokenizer_model=out)
    ref = RustTokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.vocab_size == ref.get_vocab_size() == 600
    assert tok.eod == ref.token_to_id("<|endoftext|>")
    texts = _demo_texts(10)
    assert tok.tokenize_batch(texts) == [e.ids for e in ref.encode_batch(texts)]
    assert tok.detokenize(tok.tokenize(texts[0])) == texts[0]
    gpt2_style = build_tokenizer("GPT2BPETokenizer", out / "vocab.json", out / "merges.txt")
    assert gpt2_style.tokenize(texts[1]) == tok.tokenize(texts[1])


def test_sentencepiece(tmp_path):
    import sentencepiece as spm

    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n".join(_demo_texts(60)))
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(tmp_path / "sp"), vocab_size=300, minloglevel=2
    )
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=tmp_path / "sp.model")
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    texts = _demo_texts(5)
    assert tok.tokenize_batch(texts) == [ref.encode(t) for t in texts]
    assert tok.eod == ref.eos_id() and tok.vocab_size == 300
    tok.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").tokenize(texts[0]) == ref.encode(texts[0])


def test_bad_tokenizer_arguments(tmp_path):
    with pytest.raises(DataError, match="--tokenizer-type"):
        build_tokenizer("NoSuchTokenizer")
    with pytest.raises(DataError, match="--vocab-file"):
        build_tokenizer("GPT2BPETokenizer", tmp_path / "missing.json", TINY_MERGES)
    with pytest.raises(DataError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", TINY_VOCAB, None)
    with pytest.raises(DataError, match="--tokenizer-model"):
        build_tokenizer("HFTokenizer", tokenizer_model=tmp_path)


def test_detokenize_numpy(tiny_tok):
    ids = np.asarray(tiny_tok.tokenize("To be, or not to be"), dtype=np.uint16)
    assert tiny_tok.detokenize(ids) == "To be, or not to be"
