"""Tiny Llama-family Hugging Face folders with random weights, built from local configs.

One per family, GQA on (4 query heads, 2 KV groups): Llama untied (``lm_head`` stored),
Mistral and Qwen2 tied, Qwen2 with its QKV bias; and a tied Llama with MQA (1 KV group). Every parameter, the RMSNorm weights and
biases included, gets noise so that a swapped or misplaced tensor changes the logits. Each
folder carries a byte-level BPE ``tokenizer.json`` (256 bytes + an end-of-text token) and a
``tokenizer_config.json`` naming that token as eos.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 300  # model rows; the tokenizer has 257 (the rest are unused, as in real models)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    # MQA: one KV group, so at TP2 both ranks share it (the "replicated" GQA split)
    "llama-mqa": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"tie_word_embeddings": True, "num_key_value_heads": 1},
    ),
}
EOS = "<|endoftext|>"


def hf_config(family: str, **overrides):
    import transformers

    conf_cls, _, extra = FAMILIES[family]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        bos_token_id=256,
        eos_token_id=256,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    return getattr(transformers, conf_cls)(**kwargs)


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE without merges: ids 0..255 are bytes, 256 is ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    tok.save(str(folder / "tokenizer.json"))
    conf = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "bos_token": EOS,
        "model_max_length": 64,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(conf, indent=2))


def make_hf_llama(folder: Path, family: str, seed: int = 0):
    """Save a tiny random ``family`` model (and tokenizer) into ``folder``; return the model."""
    import transformers

    _, model_cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(hf_config(family))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return model
