"""Named model sizes with exact shapes, from test-sized toys up to MT-NLG 530B.

``gpt3-*`` follow Table 2.1 of Brown et al. 2020; ``mtnlg-530b`` follows Smith et al. 2022;
``gpt2-*`` are the OpenAI GPT-2 checkpoints' shapes (1024 positions). The Llama-family sizes
(``llama*``, ``mistral-7b``, ``qwen2*``) are those of the released models' ``config.json``:
RoPE (Llama 3.1 / 3.2: with their ``llama3`` scaling to 131,072 positions), RMSNorm, SwiGLU, no
linear biases (Qwen2: a QKV bias), grouped-query attention where the model has it, an untied
output layer (Llama 3.2, Qwen2 and Qwen2.5 0.5B tie it); ``seq_length`` is a training default.
"""

from __future__ import annotations

from mtnlg.config import ModelConfig

_LLAMA = {
    "position_embedding_type": "rope",
    "normalization": "rmsnorm",
    "swiglu": True,
    "untie_embeddings_and_output_weights": True,
    "add_bias_linear": False,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
}

# Llama 3.1 / 3.2's RoPE scaling (their config.json "rope_scaling", rope_type llama3)
_LLAMA3_8X = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
_LLAMA3_32X = {**_LLAMA3_8X, "factor": 32.0}

# name: (layers, hidden, heads, seq_length, extra overrides)
_PRESETS: dict[str, tuple[int, int, int, int, dict]] = {
    "tiny": (2, 64, 4, 64, {}),
    "tiny-4l": (4, 64, 4, 64, {}),
    "small-demo": (4, 128, 4, 128, {}),
    "gpt2-124m": (12, 768, 12, 1024, {}),
    "gpt2-355m": (24, 1024, 16, 1024, {}),
    "gpt2-774m": (36, 1280, 20, 1024, {}),
    "gpt2-1.5b": (48, 1600, 25, 1024, {}),
    "gpt3-125m": (12, 768, 12, 2048, {}),
    "gpt3-350m": (24, 1024, 16, 2048, {}),
    "gpt3-760m": (24, 1536, 16, 2048, {}),
    "gpt3-1.3b": (24, 2048, 16, 2048, {}),
    "gpt3-2.7b": (32, 2560, 32, 2048, {}),
    "gpt3-6.7b": (32, 4096, 32, 2048, {}),
    "gpt3-13b": (40, 5120, 40, 2048, {}),
    "gpt3-175b": (96, 12288, 96, 2048, {}),
    "mtnlg-530b": (105, 20480, 128, 2048, {"init_method_std": 0.004}),
    "llama-tiny": (2, 64, 4, 64, {**_LLAMA, "num_query_groups": 2, "ffn_hidden_size": 176}),
    "llama2-7b": (32, 4096, 32, 4096, {**_LLAMA, "ffn_hidden_size": 11008, "vocab_size": 32000}),
    "llama2-13b": (40, 5120, 40, 4096, {**_LLAMA, "ffn_hidden_size": 13824, "vocab_size": 32000}),
    "llama2-70b": (
        80, 8192, 64, 4096,
        {**_LLAMA, "ffn_hidden_size": 28672, "num_query_groups": 8, "vocab_size": 32000},
    ),
    "llama3-8b": (
        32, 4096, 32, 8192,
        {**_LLAMA, "ffn_hidden_size": 14336, "num_query_groups": 8, "vocab_size": 128256,
         "rotary_base": 500000.0},
    ),
    "llama3.1-8b": (
        32, 4096, 32, 8192,
        {**_LLAMA, "ffn_hidden_size": 14336, "num_query_groups": 8, "vocab_size": 128256,
         "rotary_base": 500000.0, "max_position_embeddings": 131072, "rope_scaling": _LLAMA3_8X},
    ),
    "llama3.2-1b": (
        16, 2048, 32, 8192,
        {**_LLAMA, "ffn_hidden_size": 8192, "num_query_groups": 8, "vocab_size": 128256,
         "untie_embeddings_and_output_weights": False, "rotary_base": 500000.0,
         "max_position_embeddings": 131072, "rope_scaling": _LLAMA3_32X},
    ),
    "llama3.2-3b": (
        28, 3072, 24, 8192,
        {**_LLAMA, "ffn_hidden_size": 8192, "num_query_groups": 8, "vocab_size": 128256,
         "untie_embeddings_and_output_weights": False, "rotary_base": 500000.0,
         "max_position_embeddings": 131072, "rope_scaling": _LLAMA3_32X},
    ),
    "mistral-7b": (
        32, 4096, 32, 4096,
        {**_LLAMA, "ffn_hidden_size": 14336, "num_query_groups": 8, "vocab_size": 32768,
         "rotary_base": 1000000.0, "max_position_embeddings": 32768},
    ),
    "qwen2-0.5b": (
        24, 896, 14, 4096,
        {**_LLAMA, "ffn_hidden_size": 4864, "num_query_groups": 2, "vocab_size": 151936,
         "add_qkv_bias": True, "untie_embeddings_and_output_weights": False,
         "rotary_base": 1000000.0, "layernorm_epsilon": 1e-6, "max_position_embeddings": 32768},
    ),
    "qwen2.5-0.5b": (
        24, 896, 14, 4096,
        {**_LLAMA, "ffn_hidden_size": 4864, "num_query_groups": 2, "vocab_size": 151936,
         "add_qkv_bias": True, "untie_embeddings_and_output_weights": False,
         "rotary_base": 1000000.0, "layernorm_epsilon": 1e-6, "max_position_embeddings": 32768},
    ),
    "qwen2.5-7b": (
        28, 3584, 28, 4096,
        {**_LLAMA, "ffn_hidden_size": 18944, "num_query_groups": 4, "vocab_size": 152064,
         "add_qkv_bias": True, "rotary_base": 1000000.0, "layernorm_epsilon": 1e-6,
         "max_position_embeddings": 131072},
    ),
}  # fmt: skip


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
    """Return the ModelConfig of a named size; keyword overrides replace fields."""
    if name not in _PRESETS:
        raise ValueError(f"--preset {name!r} is unknown; choose one of: {', '.join(_PRESETS)}")
    layers, hidden, heads, seq, extra = _PRESETS[name]
    fields = dict(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        seq_length=seq,
        vocab_size=50257,
        extra={"preset": name},
    )
    fields.update(extra)
    fields.update(overrides)
    return ModelConfig(**fields)


def format_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
