"""Tiny GPT-2 and Llama (GQA) models for the pruning tests: Hugging Face folders built from
configs with random weights (``save_pretrained`` of transformers 5), converted to mtnlg at TP1
and at TP2 x PP2, and a raw-text calibration file (Shakespeare, as users pass text)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.checkpoint.llama_models import hf_config, write_tokenizer
from tests.e2e.conftest import ROOT, TINY_MERGES, TINY_VOCAB, demo_prefix  # noqa: F401 (fixture)

SEQ = 16
CALIB_SAMPLES = 12


def _noisy(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def make_gpt2(folder: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab = len(json.loads(TINY_VOCAB.read_text()))
    conf = GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=64, n_layer=4, n_head=4, eos_token_id=0
    )
    _noisy(GPT2LMHeadModel(conf), 1).save_pretrained(folder)
    shutil.copyfile(TINY_VOCAB, folder / "vocab.json")
    shutil.copyfile(TINY_MERGES, folder / "merges.txt")


def make_llama(folder: Path):
    """Llama, untied, GQA: 4 query heads in 2 groups, head dim 8, 4 blocks."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    conf = hf_config("llama", num_hidden_layers=4, max_position_embeddings=32)
    _noisy(LlamaForCausalLM(conf), 1).save_pretrained(folder)
    write_tokenizer(folder)


def _family(tmp_path_factory, name: str, make) -> dict:
    from mtnlg.checkpoint.convert import hf_to_mtnlg

    d = tmp_path_factory.mktemp(name)
    make(d / "hf")
    hf_to_mtnlg(str(d / "hf"), str(d / "tp1"), 1, 1, make_vocab_size_divisible_by=8)
    hf_to_mtnlg(str(d / "hf"), str(d / "tp2pp2"), 2, 2, make_vocab_size_divisible_by=8)
    lines = (ROOT / "data" / "demo" / "shakespeare.jsonl").read_text().splitlines()[:40]
    (d / "calib.txt").write_text("\n".join(json.loads(x)["text"] for x in lines))
    return {"dir": d, "hf": d / "hf", "tp1": d / "tp1", "tp2pp2": d / "tp2pp2", "name": name}


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory) -> dict:
    return _family(tmp_path_factory, "gpt2", make_gpt2)


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> dict:
    return _family(tmp_path_factory, "llama", make_llama)


def calib_argv(model: dict, ckpt: str, scores_out: Path, *extra) -> list[str]:
    return [
        "--load", str(model[ckpt]), "--calib-data", str(model["dir"] / "calib.txt"),
        "--calib-samples", str(CALIB_SAMPLES), "--seq-length", str(SEQ),
        "--micro-batch-size", "2", "--scores-out", str(scores_out), "--no-progress", *extra,
    ]  # fmt: skip
