import json
import shutil

import pytest
import torch

from tests.e2e.conftest import ROOT, TINY_MERGES, TINY_VOCAB

TEXT = " ".join(
    json.loads(line)["text"]
    for line in (ROOT / "data" / "demo" / "shakespeare.jsonl").read_text().splitlines()[:6]
)


def make_hf_gpt2(folder, n_layer=2, seed=0):
    """A tiny GPT2LMHeadModel with random weights (LayerNorms and biases too) + tiny BPE files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    vocab = len(json.loads(TINY_VOCAB.read_text()))
    conf = GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=64, n_layer=n_layer, n_head=4, eos_token_id=0
    )
    model = GPT2LMHeadModel(conf)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    model.save_pretrained(folder)
    shutil.copyfile(TINY_VOCAB, folder / "vocab.json")
    shutil.copyfile(TINY_MERGES, folder / "merges.txt")
    return model


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny"
    make_hf_gpt2(d)
    return d
