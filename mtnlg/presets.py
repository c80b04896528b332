"""Named model sizes with exact shapes, from test-sized toys up to MT-NLG 530B.

``gpt3-*`` follow Table 2.1 of Brown et al. 2020; ``mtnlg-530b`` follows Smith et al. 2022;
``gpt2-*`` are the OpenAI GPT-2 checkpoints' shapes (1024 positions).
"""

from __future__ import annotations

from mtnlg.config import ModelConfig

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
}


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
