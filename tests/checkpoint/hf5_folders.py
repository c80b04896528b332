"""Hugging Face GPT-2 folders as ``transformers`` 5 saves them.

``save_pretrained`` of a fast GPT-2 tokenizer writes ``tokenizer.json``,
``tokenizer_config.json`` and, when the tokenizer has a chat template, ``chat_template.jinja``:
no ``special_tokens_map.json``, no ``vocab.json``/``merges.txt``. These builders use the real
``save_pretrained`` (model and tokenizer) on the repo's tiny 5,000-token GPT-2 BPE, so a folder
is exactly what users download or save.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.e2e.conftest import TINY_MERGES, TINY_VOCAB

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def save_hf5_tokenizer(folder: Path, chat_template: str | None = CHAT_TEMPLATE):
    """A real ``GPT2TokenizerFast`` on the tiny vocabulary, saved by ``save_pretrained``."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast(vocab=str(TINY_VOCAB), merges=str(TINY_MERGES))
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return tok


def make_hf5_gpt2(
    folder: Path,
    n_layer: int = 2,
    n_positions: int = 64,
    seed: int = 0,
    chat_template: str | None = CHAT_TEMPLATE,
):
    """``GPT2LMHeadModel(config).save_pretrained(folder)`` plus the saved tokenizer; returns
    the model (random weights, LayerNorms and biases perturbed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    vocab = len(json.loads(TINY_VOCAB.read_text()))
    conf = GPT2Config(
        vocab_size=vocab,
        n_positions=n_positions,
        n_embd=64,
        n_layer=n_layer,
        n_head=4,
        eos_token_id=vocab - 1,
        bos_token_id=vocab - 1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(conf)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(folder)
    save_hf5_tokenizer(folder, chat_template)
    return model
