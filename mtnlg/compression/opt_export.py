"""A GPT-2 Hugging Face folder rewritten as ``OPTForCausalLM``: the carrier of quantized GPT-2.

compressed-tensors quantizes ``nn.Linear`` only, and ``GPT2LMHeadModel`` holds its block weights
in ``Conv1D`` (an (in, out) matrix), which it skips: a quantized GPT-2 folder would hold no
quantized tensor. OPT with ``do_layer_norm_before=True`` is GPT-2's block exactly (pre-norm,
biased linears, learned positions, tied head) built from ``nn.Linear``, so the same function is
exported under that class, which ``transformers`` and vLLM load:

* ``c_attn`` splits into ``q_proj``, ``k_proj``, ``v_proj`` (our fused QKV is [q | k | v]);
  every weight is taken in ``nn.Linear``'s (out, in) layout (``HFReader`` transposes Conv1D);
* OPT's learned positions are looked up at ``position + 2``: two zero rows go before ``wpe``;
* OPT's LayerNorms use the default eps 1e-5 (GPT-2's default too; another eps is refused).

OPT derives positions from the attention mask (``cumsum(mask) - 1``): equal to GPT-2's for
unpadded or right-padded input; left padding shifts GPT-2's positions but not OPT's.
``config.json`` says so: ``"mtnlg": {"exported_from": "gpt2", "carrier": "OPTForCausalLM"}``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from mtnlg.checkpoint.hf import HFReader, HFShardWriter
from mtnlg.compression.quant_schemes import QuantizeError

CARRIER = "OPTForCausalLM"
OPT_POS_OFFSET = 2
D = "model.decoder."
L = D + "layers.{i}."
# (our name template, OPT name templates): one OPT tensor per name, or [q, k, v] split of QKV
GLOBAL_TABLE: list[tuple[str, list[str]]] = [
    ("embedding.word_embeddings.weight", [D + "embed_tokens.weight"]),
    ("embedding.position_embeddings.weight", [D + "embed_positions.weight"]),
]
LAYER_TABLE: list[tuple[str, list[str]]] = [
    ("layers.{i}.ln_1.weight", [L + "self_attn_layer_norm.weight"]),
    ("layers.{i}.ln_1.bias", [L + "self_attn_layer_norm.bias"]),
    ("layers.{i}.attention.qkv.weight", [L + f"self_attn.{p}_proj.weight" for p in "qkv"]),
    ("layers.{i}.attention.qkv.bias", [L + f"self_attn.{p}_proj.bias" for p in "qkv"]),
    ("layers.{i}.attention.dense.weight", [L + "self_attn.out_proj.weight"]),
    ("layers.{i}.attention.dense.bias", [L + "self_attn.out_proj.bias"]),
    ("layers.{i}.ln_2.weight", [L + "final_layer_norm.weight"]),
    ("layers.{i}.ln_2.bias", [L + "final_layer_norm.bias"]),
    ("layers.{i}.mlp.up.weight", [L + "fc1.weight"]),
    ("layers.{i}.mlp.up.bias", [L + "fc1.bias"]),
    ("layers.{i}.mlp.down.weight", [L + "fc2.weight"]),
    ("layers.{i}.mlp.down.bias", [L + "fc2.bias"]),
]
FINAL_TABLE: list[tuple[str, list[str]]] = [
    ("final_norm.weight", [D + "final_layer_norm.weight"]),
    ("final_norm.bias", [D + "final_layer_norm.bias"]),
]
# GPT2Config options OPT cannot express, with the value OPT computes
_GPT2_FIXED = {
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


def table(n_layers: int) -> list[tuple[str, list[str]]]:
    """The whole map, in file order: globals, each block, the final norm."""
    layers = [
        (ours.format(i=i), [t.format(i=i) for t in opt])
        for i in range(n_layers)
        for ours, opt in LAYER_TABLE
    ]
    return GLOBAL_TABLE + layers + FINAL_TABLE


def opt_tensors(name: str, t: Tensor, opt_names: list[str]) -> list[tuple[str, Tensor]]:
    """One of our (Linear-layout) tensors as its OPT tensor(s)."""
    if name == "embedding.position_embeddings.weight":
        t = torch.cat([t.new_zeros(OPT_POS_OFFSET, t.shape[1]), t])  # (2 + positions, hidden)
    parts = t.chunk(len(opt_names), dim=0)  # QKV (3h, ...) -> q, k, v (h, ...); else itself
    return [(n, p.contiguous()) for n, p in zip(opt_names, parts, strict=True)]


def opt_config(gpt2: dict) -> dict:
    """``config.json`` of the carrier, from GPT-2's."""
    from transformers import OPTConfig

    for key, want in _GPT2_FIXED.items():
        have = gpt2.get(key, want)
        if have != want:
            raise QuantizeError(
                f"GPT-2 {key}={have!r}: the {CARRIER} carrier of a quantized GPT-2 computes "
                f"{key}={want!r} only"
            )
    hidden = gpt2["n_embd"]
    conf = OPTConfig(
        vocab_size=gpt2["vocab_size"],
        hidden_size=hidden,
        num_hidden_layers=gpt2["n_layer"],
        ffn_dim=gpt2.get("n_inner") or 4 * hidden,
        num_attention_heads=gpt2["n_head"],
        max_position_embeddings=gpt2["n_positions"],
        do_layer_norm_before=True,
        word_embed_proj_dim=hidden,
        activation_function=gpt2.get("activation_function", "gelu_new"),
        enable_bias=True,
        dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=gpt2.get("bos_token_id"),
        eos_token_id=gpt2.get("eos_token_id"),
        architectures=[CARRIER],
    )
    d = conf.to_dict()
    d["dtype"] = "float32"
    d["mtnlg"] = {"exported_from": "gpt2", "carrier": CARRIER}
    return d


def gpt2_to_opt(src: str | Path, out: str | Path) -> Path:
    """Write the fp32 ``OPTForCausalLM`` folder of the GPT-2 folder ``src`` (one tensor in
    memory at a time) into ``out``, tokenizer files copied; returns ``out``."""
    src, out = Path(src), Path(out)
    reader = HFReader(src)
    reader.check_tied_head()
    config = opt_config(reader.config)
    plan_src = table(config["num_hidden_layers"])
    shapes = _carrier_shapes(config)
    plan = [(name, n, shapes[n]) for name, opt_names in plan_src for n in opt_names]
    out.mkdir(parents=True, exist_ok=False)
    writer = HFShardWriter(out, plan, torch.float32, max_shard_bytes=2**40)
    for name, opt_names in plan_src:
        for opt_name, t in opt_tensors(name, reader.get(name), opt_names):
            writer.add(opt_name, t)
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, out / f)
    return out


def _carrier_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every carrier tensor's shape, from an ``OPTForCausalLM`` built on the meta device."""
    from transformers import OPTConfig, OPTForCausalLM

    with torch.device("meta"):
        model = OPTForCausalLM(OPTConfig.from_dict(config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
