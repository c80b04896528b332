"""Hugging Face ``OPTForCausalLM`` folders that are GPT-2 in structure -> ``GPTModel`` (read only).

compressed-tensors quantizes ``nn.Linear`` layers but not GPT-2's ``Conv1D``, so a quantized
GPT-2 leaves mtnlg as an OPT "carrier" (``config.json``'s ``"mtnlg": {"exported_from": "gpt2"}``).
OPT computes GPT-2 exactly when it is pre-LN (``do_layer_norm_before``), uses the tanh GeLU,
has biases and an affine LayerNorm everywhere, ties its head, and has no embedding projection
(``word_embed_proj_dim == hidden_size``). The mapping:

* ``q_proj | k_proj | v_proj`` rows (weights and biases) = our ``attention.qkv`` ([q | k | v],
  GPT-2's ``c_attn`` transposed); ``out_proj`` = ``attention.dense``; ``fc1`` / ``fc2`` =
  ``mlp.up`` / ``mlp.down``. All are ``nn.Linear`` (out, in): nothing is transposed.
* ``self_attn_layer_norm`` / ``final_layer_norm`` of a layer = ``ln_1`` / ``ln_2``;
  ``model.decoder.final_layer_norm`` = ``final_norm``.
* ``embed_positions.weight`` has 2 leading rows that OPT never reads (its position ids start
  at 2): they are dropped.

Any other OPT (post-LN like opt-350m, ``project_in``/``project_out``, ReLU) is refused naming
the ``config.json`` key, because ``GPTModel`` would compute something else.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from mtnlg.checkpoint.rules import CheckpointError
from mtnlg.config import ModelConfig

MODEL_TYPES = {"opt": "OPTForCausalLM"}
POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset

_L = r"model\.decoder\.layers\.(\d+)\."
# (HF regex, GPTModel template, part of the fused QKV or None)
OPT_RULES: list[tuple[str, str, str | None]] = [
    (r"model\.decoder\.embed_tokens\.weight", "embedding.word_embeddings.weight", None),
    (r"model\.decoder\.embed_positions\.weight", "embedding.position_embeddings.weight", "pos"),
    (_L + r"self_attn_layer_norm\.(weight|bias)", "layers.{0}.ln_1.{1}", None),
    (_L + r"self_attn\.q_proj\.(weight|bias)", "layers.{0}.attention.qkv.{1}", "q"),
    (_L + r"self_attn\.k_proj\.(weight|bias)", "layers.{0}.attention.qkv.{1}", "k"),
    (_L + r"self_attn\.v_proj\.(weight|bias)", "layers.{0}.attention.qkv.{1}", "v"),
    (_L + r"self_attn\.out_proj\.(weight|bias)", "layers.{0}.attention.dense.{1}", None),
    (_L + r"final_layer_norm\.(weight|bias)", "layers.{0}.ln_2.{1}", None),
    (_L + r"fc1\.(weight|bias)", "layers.{0}.mlp.up.{1}", None),
    (_L + r"fc2\.(weight|bias)", "layers.{0}.mlp.down.{1}", None),
    (r"model\.decoder\.final_layer_norm\.(weight|bias)", "final_norm.{0}", None),
]
_COMPILED = [(re.compile(f"^{p}$"), t, part) for p, t, part in OPT_RULES]
LM_HEAD = "lm_head.weight"
EMBED = "model.decoder.embed_tokens.weight"

# OPTConfig key -> the value GPT-2's structure needs (and OPTConfig's default when absent)
_REQUIRED = {
    "do_layer_norm_before": (True, True, "post-LN OPT (opt-350m style) is not GPT-2"),
    "_remove_final_layer_norm": (False, False, "GPT-2 has a final LayerNorm"),
    "enable_bias": (True, True, "GPT-2 has a bias on every linear layer"),
    "layer_norm_elementwise_affine": (True, True, "GPT-2's LayerNorms are affine"),
    "tie_word_embeddings": (True, True, "mtnlg's GPT-2 ties the output layer"),
}
_GELU = ("gelu_new", "gelu_pytorch_tanh")


def _refuse(key: str, value, why: str) -> CheckpointError:
    return CheckpointError(
        f"OPTForCausalLM config {key}={value!r}: {why}; only an OPT with GPT-2's structure "
        "(pre-LN, tanh GeLU, biases, tied head, word_embed_proj_dim == hidden_size) is read"
    )


def config_from_hf(hf: dict, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """GPT-2 ``ModelConfig`` from an OPT ``config.json`` dict; other OPTs refused by key."""
    if hf.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(f"model_type={hf.get('model_type')!r} is not OPT")
    for key, (want, default, why) in _REQUIRED.items():
        if hf.get(key, default) != want:
            raise _refuse(key, hf.get(key, default), why)
    act = hf.get("activation_function", "relu")
    if act not in _GELU:
        raise _refuse("activation_function", act, "GPT-2 computes the tanh GeLU")
    h = hf["hidden_size"]
    proj = hf.get("word_embed_proj_dim", h)
    if proj != h:
        raise _refuse("word_embed_proj_dim", proj, f"project_in/project_out (hidden {h})")
    n_pos = hf["max_position_embeddings"]
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=h,
        num_attention_heads=hf["num_attention_heads"],
        seq_length=n_pos,
        max_position_embeddings=n_pos,
        vocab_size=hf["vocab_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        ffn_hidden_size=hf.get("ffn_dim") or 4 * h,
        hidden_dropout=float(hf.get("dropout", 0.1)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        init_method_std=hf.get("init_std", 0.02),
        layernorm_epsilon=1e-5,  # OPT's nn.LayerNorm default; OPTConfig has no key for it
    )


def hf_to_ours_name(hf_name: str) -> tuple[str, str | None] | None:
    """(GPTModel name, part) for an OPT key; None for the tied ``lm_head.weight``."""
    for pat, template, part in _COMPILED:
        m = pat.match(hf_name)
        if m:
            return template.format(*m.groups()), part
    if hf_name == LM_HEAD:
        return None
    raise CheckpointError(f"unknown OPT key {hf_name!r} (not part of a GPT-2-structured OPT)")


def combine(name: str, parts: dict[str | None, Tensor]) -> Tensor:
    """Our tensor from its OPT pieces (``parts``: part -> fp32 tensor)."""
    if set(parts) == {"q", "k", "v"}:
        return torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if set(parts) == {"pos"}:
        return parts["pos"][POSITION_OFFSET:]
    if set(parts) == {None}:
        return parts[None]
    raise CheckpointError(f"{name}: OPT pieces {sorted(map(str, parts))} do not make it")
