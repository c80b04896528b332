"""GPT-2-structured ``OPTForCausalLM`` folders read as mtnlg's GPT-2, checked with transformers.

1. A random OPT built by ``transformers`` from a GPT-2-shaped OPTConfig (pre-LN, gelu_new, biases,
   tied, no embedding projection): mtnlg's logits through ``load_full_state`` equal OPT's.
2. A random GPT-2 mapped to OPT by the mapping written here (q/k/v split from ``c_attn``, Conv1D
   transposed, 2 zero rows before the positions): GPT-2, the OPT and mtnlg give the same logits,
   and mtnlg reads both folders into the same tensors.
3. Any other OPT is refused naming the config key.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mtnlg.checkpoint import CheckpointError, load_full_state, load_into_model
from mtnlg.checkpoint.hf import config_from_hf
from tests.checkpoint.conftest import make_hf_gpt2
from tests.e2e.conftest import TINY_MERGES, TINY_VOCAB

E, LAYERS, HEADS, POS = 64, 2, 4, 32


def opt_config(**overrides):
    from transformers import OPTConfig

    kwargs = dict(
        vocab_size=len(json.loads(TINY_VOCAB.read_text())),
        hidden_size=E,
        num_hidden_layers=LAYERS,
        ffn_dim=4 * E,
        num_attention_heads=HEADS,
        max_position_embeddings=POS,
        do_layer_norm_before=True,
        word_embed_proj_dim=E,
        activation_function="gelu_new",
        enable_bias=True,
        dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=0,
        eos_token_id=0,
    )
    kwargs.update(overrides)
    return OPTConfig(**kwargs)


def gpt2_to_opt(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel state -> OPTForCausalLM state (the export's mapping, written out here)."""
    d, sd = "model.decoder.", {}
    sd[d + "embed_tokens.weight"] = g["transformer.wte.weight"]
    sd[d + "embed_positions.weight"] = torch.cat([torch.zeros(2, E), g["transformer.wpe.weight"]])
    sd[d + "final_layer_norm.weight"] = g["transformer.ln_f.weight"]
    sd[d + "final_layer_norm.bias"] = g["transformer.ln_f.bias"]
    sd["lm_head.weight"] = g["transformer.wte.weight"]
    for i in range(LAYERS):
        p, o = f"transformer.h.{i}.", f"{d}layers.{i}."
        qkv_w, qkv_b = g[p + "attn.c_attn.weight"].t().split(E), g[p + "attn.c_attn.bias"].split(E)
        for j, n in enumerate("qkv"):
            sd[o + f"self_attn.{n}_proj.weight"] = qkv_w[j]
            sd[o + f"self_attn.{n}_proj.bias"] = qkv_b[j]
        pairs = [("self_attn.out_proj", "attn.c_proj"), ("fc1", "mlp.c_fc"), ("fc2", "mlp.c_proj")]
        for ours, theirs in pairs:
            sd[o + ours + ".weight"] = g[p + theirs + ".weight"].t()
            sd[o + ours + ".bias"] = g[p + theirs + ".bias"]
        for ours, theirs in [("self_attn_layer_norm", "ln_1"), ("final_layer_norm", "ln_2")]:
            sd[o + ours + ".weight"] = g[p + theirs + ".weight"]
            sd[o + ours + ".bias"] = g[p + theirs + ".bias"]
    return {k: v.contiguous() for k, v in sd.items()}


def mtnlg_logits(folder, ids):
    from mtnlg.model import GPTModel

    cfg, full, tok = load_full_state(folder)
    model = GPTModel(cfg).eval()
    load_into_model(model, full, 1, 0)
    with torch.no_grad():
        return model.full_logits(ids), full, tok


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(3))


def test_random_opt_logits_equal_transformers(tmp_path, ids):
    from transformers import OPTForCausalLM

    torch.manual_seed(1)
    model = OPTForCausalLM(opt_config()).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms and biases too: a misplaced tensor shows
            p.add_(torch.randn_like(p) * 0.05)
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    got, full, _ = mtnlg_logits(tmp_path, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert full["embedding.position_embeddings.weight"].shape == (POS, E)


def test_gpt2_mapped_to_opt_gives_gpt2s_logits(tmp_path, ids):
    from transformers import OPTForCausalLM

    gpt2 = make_hf_gpt2(tmp_path / "gpt2")
    opt = OPTForCausalLM(opt_config()).eval()
    opt.load_state_dict(gpt2_to_opt(gpt2.state_dict()), strict=True)
    opt.save_pretrained(tmp_path / "opt")
    shutil.copyfile(TINY_VOCAB, tmp_path / "opt" / "vocab.json")
    shutil.copyfile(TINY_MERGES, tmp_path / "opt" / "merges.txt")
    with torch.no_grad():
        want = gpt2(ids).logits
        torch.testing.assert_close(opt(ids).logits, want, atol=1e-4, rtol=0)
    got, full_opt, tok = mtnlg_logits(tmp_path / "opt", ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    _, full_gpt2, tok2 = mtnlg_logits(tmp_path / "gpt2", ids)
    assert full_opt.keys() == full_gpt2.keys()
    for name in full_gpt2:
        torch.testing.assert_close(full_opt[name], full_gpt2[name], atol=0, rtol=0, msg=name)
    assert type(tok).__name__ == type(tok2).__name__ == "GPT2BPETokenizer"  # GPT-2's BPE files


@pytest.mark.parametrize(
    "key,value",
    [
        ("do_layer_norm_before", False),  # post-LN, opt-350m style
        ("word_embed_proj_dim", 32),  # project_in / project_out
        ("activation_function", "relu"),
        ("enable_bias", False),
        ("layer_norm_elementwise_affine", False),
        ("_remove_final_layer_norm", True),
        ("tie_word_embeddings", False),
    ],
)
def test_other_opts_refused_by_key(key, value):
    conf = opt_config().to_dict()
    conf[key] = value
    with pytest.raises(CheckpointError, match=key):
        config_from_hf(conf)


def test_refused_opt_folder_names_the_key(tmp_path):
    from transformers import OPTForCausalLM

    OPTForCausalLM(opt_config(do_layer_norm_before=False)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="do_layer_norm_before=False"):
        load_full_state(tmp_path)
