"""Tiny models for the quantized-export tests (hidden 256, so int4 groups of 128 divide every
input dimension), and the reading of a compressed-tensors folder done here, independently of
compressed-tensors: the packed integers unpacked by hand, scale x q rebuilt per group or row.

Models: GPT-2 (mtnlg's tiny BPE tokenizer) imported into mtnlg at TP1 and TP2 x PP2; Llama with
GQA (4 query heads, 2 KV groups, untied head); Qwen2 (QKV bias, untied head). Every parameter
gets noise so that a misplaced tensor changes the logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.checkpoint.llama_models import hf_config, write_tokenizer
from tests.e2e.conftest import ROOT, TINY_MERGES, TINY_VOCAB

HIDDEN = 256
SEQ = 32
SAMPLES = 8


def _noisy(model, seed: int, scale: float = 0.05):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def make_gpt2(folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab = len(json.loads(TINY_VOCAB.read_text()))
    conf = GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=HIDDEN, n_layer=2, n_head=4, eos_token_id=0
    )
    _noisy(GPT2LMHeadModel(conf), 1).save_pretrained(folder)
    shutil.copyfile(TINY_VOCAB, folder / "vocab.json")
    shutil.copyfile(TINY_MERGES, folder / "merges.txt")


def make_llama_family(folder: Path, family: str) -> None:
    """``llama``: GQA, untied; ``qwen2``: QKV bias, untied head."""
    import transformers

    torch.manual_seed(0)
    conf = hf_config(
        family,
        hidden_size=HIDDEN,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    cls = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    _noisy(getattr(transformers, cls)(conf), 1).save_pretrained(folder)
    write_tokenizer(folder)


def write_calib(path: Path, lines: int = 200) -> Path:
    text = (ROOT / "data" / "demo" / "shakespeare.jsonl").read_text().splitlines()[:lines]
    path.write_text("\n".join(json.loads(x)["text"] for x in text))
    return path


def unpack(packed: torch.Tensor, cols: int, bits: int) -> torch.Tensor:
    """int32 words (rows, cols * bits / 32), low bits first, stored value q + 2**(bits-1)
    -> q (rows, cols) as float."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = packed.to(torch.int64) & 0xFFFFFFFF  # the int32 words as unsigned
    vals = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (rows, words, per)
    q = vals.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))
    return q.to(torch.float64)


def read_quantized(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """({linear weight name: scale x q (fp32)}, {name: (q, each weight's scale)}, config.json)
    of a quantized folder."""
    st = {}
    for f in sorted(folder.glob("*.safetensors")):
        st.update(load_file(f))
    config = json.loads((folder / "config.json").read_text())
    bits = config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"]
    deq, ints = {}, {}
    for k in st:
        if not k.endswith(".weight_packed"):
            continue
        base = k.removesuffix("_packed")
        rows, cols = (int(x) for x in st[base + "_shape"])
        q = unpack(st[k], cols, bits)  # (rows, cols)
        scale = st[base + "_scale"].to(torch.float64)  # (rows, 1) or (rows, cols / group)
        group = cols // scale.shape[1]
        w = (q.reshape(rows, -1, group) * scale.unsqueeze(-1)).reshape(rows, cols)
        step = scale.repeat_interleave(group, dim=1)  # (rows, cols)
        deq[base], ints[base] = w.float(), (q, step)
    return deq, ints, config


def dequantized_reference(ref_dir: Path, folder: Path):
    """The unquantized export with each quantized weight replaced by scale x q."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    deq, _, _ = read_quantized(folder)
    sd = ref.state_dict()
    with torch.no_grad():
        for name, w in deq.items():
            sd[name].copy_(w)
    return ref, deq


def ids(vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 24), generator=g)
