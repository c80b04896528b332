"""Preset shapes and parameter counts against independent figures."""

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from mtnlg.config import ModelConfig
from mtnlg.presets import get_preset, preset_names


def test_gpt2_124m_matches_hugging_face_count():
    # HF counts GPT-2 small with the tied output layer once: 124,439,808.
    assert get_preset("gpt2-124m").num_parameters() == 124_439_808


def test_counter_matches_transformers_on_a_small_shape():
    cfg = ModelConfig(
        num_layers=3, hidden_size=96, num_attention_heads=4, vocab_size=1000, seq_length=64
    )
    hf = GPT2LMHeadModel(
        GPT2Config(n_layer=3, n_embd=96, n_head=4, vocab_size=1000, n_positions=64)
    )
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())


def test_mtnlg_530b_shape_and_count():
    cfg = get_preset("mtnlg-530b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.seq_length) == (
        105,
        20480,
        128,
        2048,
    )
    assert cfg.vocab_size == 50257 and cfg.init_method_std == 0.004
    assert 525e9 < cfg.num_parameters() < 535e9


@pytest.mark.parametrize(
    "name,billions",
    [("gpt3-125m", 0.125), ("gpt3-1.3b", 1.3), ("gpt3-13b", 13), ("gpt3-175b", 175)],
)
def test_gpt3_family_sizes(name, billions):
    n = get_preset(name).num_parameters() / 1e9
    assert abs(n - billions) / billions < 0.05


def test_vocab_padding():
    cfg = get_preset("gpt2-124m")
    assert cfg.padded_vocab_size(1) == 50304
    assert cfg.padded_vocab_size(8) == 51200
    for name in preset_names():
        get_preset(name)  # every preset is a valid config
    with pytest.raises(ValueError, match="--preset"):
        get_preset("nope")


@pytest.mark.parametrize(
    "name, published",
    [  # the parameter counts on the released models' Hugging Face model cards / safetensors
        ("llama3.1-8b", 8_030_261_248),
        ("llama3.2-1b", 1_235_814_400),
        ("llama3.2-3b", 3_212_749_824),
        ("qwen2.5-0.5b", 494_032_768),
        ("qwen2.5-7b", 7_615_616_512),
    ],
)
def test_released_llama3_qwen25_counts(name, published):
    cfg = get_preset(name)
    assert cfg.num_parameters() == published
    assert cfg.tied == (name in ("llama3.2-1b", "llama3.2-3b", "qwen2.5-0.5b"))
