"""Tokenizer files of Hugging Face folders as ``transformers`` 5 saves them (no
``special_tokens_map.json``, the chat template in ``chat_template.jinja``) and as version 4 did
(``vocab.json``/``merges.txt``, the template in ``tokenizer_config.json``): read by the
converter and the generation/serving loader, carried in the mtnlg checkpoint, written back by
the export with the template intact and the same ids as ``transformers``' own tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.checkpoint.hf5_folders import CHAT_TEMPLATE, make_hf5_gpt2
from tests.e2e.conftest import TINY_MERGES, TINY_VOCAB

TEXTS = ["it 's a charming and often affecting journey . ", "  dull\n", "Hello world"]
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture(scope="module")
def hf5_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf5") / "gpt2"
    make_hf5_gpt2(d)
    return d


def _roundtrip(src, tmp_path):
    from mtnlg.checkpoint import load_full_state
    from mtnlg.checkpoint.convert import hf_to_mtnlg, mtnlg_to_hf

    hf_to_mtnlg(str(src), str(tmp_path / "ckpt"), 2, 2, 8)
    _, _, tok = load_full_state(tmp_path / "ckpt")
    mtnlg_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"))
    return tok, tmp_path / "back"


@pytest.mark.timeout(300)
def test_hf5_folder_roundtrip_keeps_chat_template_and_ids(hf5_dir, tmp_path):
    from transformers import AutoTokenizer

    assert not (hf5_dir / "special_tokens_map.json").exists()
    assert not (hf5_dir / "vocab.json").exists()
    ours, back = _roundtrip(hf5_dir, tmp_path)
    assert ours.chat_template == CHAT_TEMPLATE  # carried in the checkpoint's tokenizer
    src, got = AutoTokenizer.from_pretrained(hf5_dir), AutoTokenizer.from_pretrained(back)
    assert got.chat_template == src.chat_template == CHAT_TEMPLATE
    assert got.apply_chat_template(MESSAGES) == src.apply_chat_template(MESSAGES)
    assert got.eos_token == src.eos_token == "<|endoftext|>"
    for text in TEXTS:
        want = src(text, add_special_tokens=False)["input_ids"]
        assert ours.tokenize(text) == got(text, add_special_tokens=False)["input_ids"] == want


@pytest.mark.timeout(300)
def test_hf4_folder_with_template_in_config_roundtrip(tmp_path):
    """vocab.json/merges.txt + a tokenizer_config.json holding the template (GPT-2 BPE path)."""
    from transformers import AutoTokenizer

    src = tmp_path / "gpt2"
    make_hf5_gpt2(src, chat_template=None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    shutil.copyfile(TINY_VOCAB, src / "vocab.json")
    shutil.copyfile(TINY_MERGES, src / "merges.txt")
    eos = "<|endoftext|>"
    conf = {"tokenizer_class": "GPT2Tokenizer", "eos_token": eos, "bos_token": eos,
            "unk_token": eos, "chat_template": CHAT_TEMPLATE}  # fmt: skip
    (src / "tokenizer_config.json").write_text(json.dumps(conf))
    (src / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos}))
    ours, back = _roundtrip(src, tmp_path)
    assert type(ours).__name__ == "GPT2BPETokenizer" and ours.chat_template == CHAT_TEMPLATE
    got = AutoTokenizer.from_pretrained(back)
    assert got.chat_template == CHAT_TEMPLATE
    assert got(TEXTS[0], add_special_tokens=False)["input_ids"] == ours.tokenize(TEXTS[0])


def test_generation_loader_and_classifier_tokenizer_files(hf5_dir, tmp_path):
    """``read_hf_tokenizer`` (converter, generation, server) reads the folder; the classifier
    export's tokenizer files name the pad token without a special_tokens_map.json."""
    from transformers import AutoTokenizer

    from mtnlg.checkpoint.hf import read_hf_tokenizer, write_hf_tokenizer
    from mtnlg.config import ModelConfig

    tok = read_hf_tokenizer(hf5_dir)
    assert tok.eod == 4999 and tok.chat_template == CHAT_TEMPLATE
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=5000)
    write_hf_tokenizer(tok, tmp_path, cfg, pad_token_id=tok.eod)
    assert not (tmp_path / "special_tokens_map.json").exists()
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.pad_token == "<|endoftext|>" and hf.padding_side == "right"
    assert hf.chat_template == CHAT_TEMPLATE


def test_broken_sidecar_is_refused_when_read(hf5_dir, tmp_path):
    from mtnlg.checkpoint.hf import read_hf_tokenizer
    from mtnlg.data.errors import DataError

    src = tmp_path / "gpt2"
    shutil.copytree(hf5_dir, src)
    (src / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="tokenizer_config.json: expected a JSON object"):
        read_hf_tokenizer(src)
