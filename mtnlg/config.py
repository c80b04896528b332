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
    """LayerNorm / RMSNorm epsilon (``--layernorm-epsilon``)."""
    position_embedding_type: str = "learned_absolute"
    """``learned_absolute`` (GPT-2) or ``rope`` (``--position-embedding-type``)."""
    rotary_base: float = 10000.0
    """RoPE base theta (``--rotary-base``)."""
    rotary_percent: float = 1.0
    """Fraction of each head's channels rotated (``--rotary-percent``; partial rotary < 1)."""
    rope_scaling: dict | None = None
    """RoPE scaling in transformers 5's ``rope_parameters`` names, less ``rope_theta``:
    ``{"rope_type": "linear" | "dynamic" | "llama3" | "yarn", "factor": ..., ...}`` (see
    ``mtnlg.model.rotary``; ``--rope-scaling-type`` and friends); None: plain RoPE."""
    sliding_window: int | None = None
    """Sliding-window attention (Mistral v0.1, Qwen2 with every layer sliding): query i attends
    to keys j with i - window < j <= i, in every layer (``--sliding-window``); None: causal."""
    normalization: str = "layernorm"
    """``layernorm`` or ``rmsnorm`` (``--normalization``)."""
    swiglu: bool = False
    """SwiGLU MLP: silu(gate) * up, gate and up fused column-parallel (``--swiglu``)."""
    num_query_groups: int | None = None
    """GQA/MQA key-value groups (``--num-query-groups``); None: one per head (plain MHA)."""
    kv_channels: int | None = None
    """Channels per attention head (``--kv-channels``, Megatron's name); None: hidden / heads.
    Explicit when heads x kv_channels != hidden (e.g. a model whose heads were pruned)."""
    untie_embeddings_and_output_weights: bool = False
    """A separate vocab-parallel output layer (``--untie-embeddings-and-output-weights``)."""
    add_bias_linear: bool = True
    """Biases on every linear layer (``--disable-bias-linear`` turns them off)."""
    add_qkv_bias: bool = False
    """A QKV bias even without the other biases (``--add-qkv-bias``, Qwen2)."""
    sequence_parallel: bool = False
    """Runtime only, never saved (``--sequence-parallel``, training): LayerNorm/dropout regions
    hold (b, s/tp, h) slices of the sequence."""
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
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"--sliding-window must be >= 1 (got {self.sliding_window})")
        if self.kv_channels is not None and self.kv_channels < 1:
            raise ValueError(f"--kv-channels must be >= 1 (got {self.kv_channels})")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"--hidden-size ({self.hidden_size}) is not divisible by "
                f"--num-attention-heads ({self.num_attention_heads}); give --kv-channels"
            )
        if self.seq_length > self.max_position_embeddings:
            raise ValueError(
                f"--seq-length ({self.seq_length}) exceeds --max-position-embeddings "
                f"({self.max_position_embeddings})"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1)")
        self._check_architecture()

    def _check_architecture(self) -> None:
        choices = {
            "position_embedding_type": ("learned_absolute", "rope"),
            "normalization": ("layernorm", "rmsnorm"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"--{name.replace('_', '-')} {getattr(self, name)!r}: choose one of {allowed}"
                )
        g = self.num_query_groups
        if g is not None and (g < 1 or self.num_attention_heads % g):
            raise ValueError(
                f"--num-query-groups ({g}) must divide --num-attention-heads "
                f"({self.num_attention_heads})"
            )
        if self.use_rope:
            if not 0.0 < self.rotary_percent <= 1.0:
                raise ValueError("--rotary-percent must be in (0, 1]")
            if self.rotary_dim < 2 or self.rotary_dim % 2:
                raise ValueError(
                    f"--rotary-percent {self.rotary_percent} gives {self.rotary_dim} rotary "
                    f"channels of head dim {self.head_dim}: it must be even and >= 2"
                )
        if self.rope_scaling is not None:
            from mtnlg.model.rotary import check_rope_scaling

            if not self.use_rope:
                raise ValueError("rope_scaling needs --position-embedding-type rope")
            check_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        """Channels per head: ``kv_channels``, else hidden / heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def attention_dim(self) -> int:
        """Width of the attention core's output (the dense projection's input): heads x head_dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def use_rope(self) -> bool:
        return self.position_embedding_type == "rope"

    @property
    def rotary_dim(self) -> int:
        """Rotated channels per head: ``int(head_dim * rotary_percent)``."""
        return int(self.head_dim * self.rotary_percent)

    @property
    def kv_groups(self) -> int:
        """Key/value heads: ``num_query_groups``, or one per attention head."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.add_bias_linear or self.add_qkv_bias

    @property
    def gpt2_compatible(self) -> bool:
        """Every architecture option at GPT-2's value (the model ``GPT2LMHeadModel`` holds)."""
        return (
            not self.use_rope
            and self.normalization == "layernorm"
            and not self.swiglu
            and self.num_query_groups is None
            and self.tied
            and self.add_bias_linear
            and self.attention_dim == self.hidden_size
        )

    @property
    def tied(self) -> bool:
        """The output layer is the input embedding (GPT-2, MT-NLG)."""
        return not self.untie_embeddings_and_output_weights

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by * tp``."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self, padded_tp: int | None = None) -> int:
        """Parameter count of the model (the output layer counted only when untied).

        With ``padded_tp=None`` the true vocabulary is counted (as Hugging Face counts);
        otherwise the vocabulary padded for that TP degree.
        """
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        v = self.vocab_size if padded_tp is None else self.padded_vocab_size(padded_tp)
        norm = h if self.normalization == "rmsnorm" else 2 * h  # weight (+ bias)
        qkv_out = (self.num_attention_heads + 2 * self.kv_groups) * self.head_dim
        up_out = 2 * f if self.swiglu else f
        bias = self.add_bias_linear
        per_layer = (
            2 * norm  # ln_1, ln_2
            + qkv_out * h
            + (qkv_out if self.qkv_bias else 0)  # fused qkv
            + self.attention_dim * h
            + (h if bias else 0)  # attention output projection
            + up_out * h
            + (up_out if bias else 0)  # mlp up (gate and up with SwiGLU)
            + f * h
            + (h if bias else 0)  # mlp down
        )
        positions = 0 if self.use_rope else self.max_position_embeddings * h
        output = 0 if self.tied else v * h
        return v * h + positions + L * per_layer + norm + output

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["sequence_parallel"]  # a property of the run, not of the weights
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)
