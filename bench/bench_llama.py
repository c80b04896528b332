"""Issue 14 benchmarks for a Llama-style model: conversion and the training step.

1. ``--part convert``: a random 24-layer ``LlamaForCausalLM`` safetensors folder (GQA, SwiGLU,
   untied ``lm_head``), then in fresh processes (peak RSS from ``/proc/self/status``, as
   ``bench/bench_convert.py`` for GPT-2): hf-to-mtnlg at TP2 x PP4, mtnlg-to-hf of that (shards
   of one layer; again with ``transformers`` imported before the clock, to separate its import
   from the conversion's own memory), and a plain safetensors read+write of the same file.
2. ``--part train``: ``bench/bench_pretrain.py --llama``: the real entry point
   (``mtnlg.training.pretrain.run``) on the demo corpus against a plain-PyTorch Llama loop
   (``bench/reference_gpt.py::ReferenceLlama``), interleaved in the same process; target
   plain tokens/s / mtnlg tokens/s <= 1.05.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_llama.py --part all

Sizes are CPU-sized (a few minutes on 2 shared cores); ``--output-json`` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_convert import run_table  # noqa: E402


def make_hf_llama(folder: Path, layers: int, h: int, heads: int, groups: int, ffn: int, vocab: int):
    """Random ``LlamaForCausalLM`` folder (HF names, fp32); returns the largest layer's bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    d = h // heads
    t = {"model.embed_tokens.weight": torch.randn(vocab, h) * 0.02}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, shape in [
            ("input_layernorm.weight", (h,)), ("self_attn.q_proj.weight", (h, h)),
            ("self_attn.k_proj.weight", (groups * d, h)), ("self_attn.v_proj.weight", (groups * d, h)),
            ("self_attn.o_proj.weight", (h, h)), ("post_attention_layernorm.weight", (h,)),
            ("mlp.gate_proj.weight", (ffn, h)), ("mlp.up_proj.weight", (ffn, h)),
            ("mlp.down_proj.weight", (h, ffn)),
        ]:  # fmt: skip
            t[p + n] = torch.randn(*shape) * 0.02
    t["model.norm.weight"] = torch.ones(h)
    t["lm_head.weight"] = torch.randn(vocab, h) * 0.02
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    conf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": groups, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(conf, indent=2))
    block = (2 * h * h + 2 * groups * d * h + 3 * ffn * h + 2 * h) * 4
    return max(block, vocab * h * 4)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=["convert", "train", "all"], default="all")
    c = p.add_argument_group("convert")
    c.add_argument("--layers", type=int, default=24)
    c.add_argument("--hidden", type=int, default=512)
    c.add_argument("--heads", type=int, default=8)
    c.add_argument("--groups", type=int, default=2, help="KV groups (GQA)")
    c.add_argument("--ffn", type=int, default=1376, help="SwiGLU width")
    c.add_argument("--vocab", type=int, default=5000)
    c.add_argument("--work", default="/tmp/bench_llama")
    t = p.add_argument_group("train (passed to bench/bench_pretrain.py --llama)")
    t.add_argument("--train-args", default="--repeats 3", help="e.g. '--repeats 3 --layers 4'")
    p.add_argument("--output-json", help="write the conversion figures here")
    a = p.parse_args(argv)
    if a.part in ("convert", "all"):
        work = Path(a.work)
        shutil.rmtree(work, ignore_errors=True)
        layer = make_hf_llama(work / "hf", a.layers, a.hidden, a.heads, a.groups, a.ffn, a.vocab)
        print(
            f"Llama-style: {a.layers} layers, h {a.hidden}, {a.heads} heads, {a.groups} KV groups,"
            f" SwiGLU {a.ffn}, vocab {a.vocab}, untied"
        )
        # the export builds config.json through transformers' LlamaConfig: its import alone
        # is ~100 MiB and seconds; a second export row has it imported before the clock
        pre = {"transformers imported first": "from transformers import LlamaConfig"}
        figures = run_table(work, a.layers, layer, pre)
        if a.output_json:
            Path(a.output_json).write_text(json.dumps(figures, indent=2))
        shutil.rmtree(work, ignore_errors=True)
    if a.part in ("train", "all"):
        from bench.bench_pretrain import main as pretrain_bench

        pretrain_bench(["--llama", *a.train_args.split()])


if __name__ == "__main__":
    main()
