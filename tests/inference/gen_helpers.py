"""Shared pieces of the generation tests: a tiny random GPT-2 and transformers' greedy output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY_VOCAB = ROOT / "data" / "gpt2-tiny" / "gpt2-tiny-vocab.json"
TINY_MERGES = ROOT / "data" / "gpt2-tiny" / "gpt2-tiny-merges.txt"
EOD = 4999  # "<|endoftext|>" in the tiny vocabulary
NEW_TOKENS = 32
# token-id prompts of different lengths (the batch mixes them)
PROMPTS = [
    [17, 402, 9, 3001, 77, 5, 1200],
    [4000],
    [256, 13, 999, 42],
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 2],
]


def make_hf_gpt2(folder: Path, seed: int = 0):
    """A random GPT2LMHeadModel (LayerNorms and biases perturbed too) saved with safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    vocab = len(json.loads(TINY_VOCAB.read_text()))
    conf = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=64,
        n_layer=3,
        n_head=4,
        eos_token_id=EOD,
        bos_token_id=EOD,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(conf)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # sharp logits: clear argmax margins
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(TINY_VOCAB, folder / "vocab.json")
    shutil.copyfile(TINY_MERGES, folder / "merges.txt")
    return model


def hf_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS, eos: int = EOD) -> list[int]:
    """transformers' own greedy generation of one prompt, alone (no padding involved)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=eos,
            eos_token_id=eos,
        )
    return out[0, len(prompt) :].tolist()


def _requests(greedy: bool = True, seed: int = 0):
    from mtnlg.inference import Request, SamplingParams

    if greedy:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True)
    else:
        params = SamplingParams(
            max_new_tokens=NEW_TOKENS, temperature=0.9, top_k=50, top_p=0.9, seed=seed
        )
    return [Request(tuple(p), params) for p in PROMPTS]


def layouts_body(rank, world_size, ckpts: dict):
    """On 4 ranks: generate at TP1, TP2, PP2 and TP2 x PP2 (groups built side by side).

    ``ckpts`` maps a layout name to the checkpoint converted for it. Returns, per layout, the
    greedy tokens, the sampled tokens (TP1 and TP2 x PP2), and on last stages the per-step
    logits with and without the KV cache."""
    import torch.distributed as dist

    from mtnlg.distributed.topology import ParallelDims, Topology
    from mtnlg.inference import Groups, InferenceEngine, broadcast_requests

    topo = Topology(ParallelDims(world_size=4, tp=2, pp=2))
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair = pairs[rank // 2]
    layouts = {
        "tp1": Groups(),
        "tp2": Groups(tp_group=pair),
        "pp2": Groups(pp_group=pair),
        "tp2pp2": Groups.from_topology(topo),
    }
    out = {}
    for name, groups in layouts.items():
        eng = InferenceEngine.load(ckpts[name], groups)
        greedy = eng.generate(_requests(), batch_size=3, return_logits=True)
        res = {"greedy": [r.tokens for r in greedy], "last": eng.is_last_stage}
        if eng.is_last_stage:
            res["logits"] = [torch.stack(r.logits) for r in greedy]
        if name in ("tp1", "tp2pp2"):
            sampled = eng.generate(_requests(greedy=False, seed=7), batch_size=3)
            res["sampled"] = [r.tokens for r in sampled]
            if name == "tp2pp2":
                ref = eng.generate(_requests(), batch_size=3, use_cache=False, return_logits=True)
                res["nocache_greedy"] = [r.tokens for r in ref]
                if eng.is_last_stage:
                    res["nocache_logits"] = [torch.stack(r.logits) for r in ref]
        out[name] = res
        dist.barrier()
    # Another saved layout (TP2 x PP1) re-cut on load for TP2 x PP2; requests shared by rank 0.
    eng = InferenceEngine.load(ckpts["tp2"], layouts["tp2pp2"])
    reqs = broadcast_requests(_requests() if rank == 0 else None)
    out["tp2pp2_from_tp2"] = {"greedy": [r.tokens for r in eng.generate(reqs, batch_size=4)]}
    return out
