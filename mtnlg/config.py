"""Model configuration: one dataclass, each field documented and validated.

The resolved config is saved beside every checkpoint (``to_dict`` / ``from_dict``), so loading a
checkpoint needs no model flags.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Shape and regularisation of a GPT-2 / MT-NLG style decoder."""

    num_layers: int
    """Transformer blocks (``--num-layers``)."""
    hidden_size: int
    """Model width h (``--hidden-size``)."""
    num_attention_heads: int
    """Attention heads (``--num-attention-heads``); h must divide by it."""
    seq_length: int = 1024
    """Training sequence length (``--seq-length``)."""
    max_position_embeddings: int | None = None
    """Learned absolute positions (``--max-position-embeddings``); defaults to seq_length."""
    vocab_size: int = 50257
    """True tokenizer vocabulary; the embedding is padded (see ``padded_vocab_size``)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this x TP (``--make-vocab-size-divisible-by``)."""
    ffn_hidden_size: int | None = None
    """MLP width (``--ffn-hidden-size``); defaults to 4h."""
    hidden_dropout: float = 0.1
    """Dropout on embeddings and residual branches (``--hidden-dropout``)."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities (``--attention-dropout``)."""
    init_method_std: float = 0.02
    """Std of the normal init (``--init-method-std``); output projections get std/sqrt(2L)."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon (``--layernorm-epsilon``)."""
    extra: dict = field(default_factory=dict)
    """Free-form notes kept with the config (preset name, tokenizer), never read by the model."""

    def __post_init__(self) -> None:
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"--hidden-size ({self.hidden_size}) is not divisible by "
                f"--num-attention-heads ({self.num_attention_heads})"
            )
        if self.seq_length > self.max_position_embeddings:
            raise ValueError(
                f"--seq-length ({self.seq_length}) exceeds --max-position-embeddings "
                f"({self.max_position_embeddings})"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by * tp``."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self, padded_tp: int | None = None) -> int:
        """Parameter count with the output layer tied to the input embedding.

        With ``padded_tp=None`` the true vocabulary is counted (as Hugging Face counts GPT-2);
        otherwise the vocabulary padded for that TP degree.
        """
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        v = self.vocab_size if padded_tp is None else self.padded_vocab_size(padded_tp)
        per_layer = (
            2 * h  # ln_1
            + 3 * h * h
            + 3 * h  # fused qkv
            + h * h
            + h  # attention output projection
            + 2 * h  # ln_2
            + h * f
            + f  # mlp up
            + f * h
            + h  # mlp down
        )
        return v * h + self.max_position_embeddings * h + L * per_layer + 2 * h

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)
