"""Shared pieces of the Llama-family generation tests: random Llama-style models built by our
own ``GPTModel``, the tiny Hugging Face Llama / Mistral / Qwen2 folders of the converter tests
(GQA: 4 query heads, 2 KV groups; a byte-level tokenizer whose end-of-text id is ``EOS``), and
left-padded prompts of different lengths."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.checkpoint.llama_models import make_hf_llama

EOS = 256  # the tokenizer's end-of-text id in every tiny HF folder (both sides stop there)
NEW_TOKENS = 20
# token-id prompts of different lengths (the batch mixes them, left-padded)
PROMPTS = [
    [17, 40, 9, 201, 77, 5, 120],
    [200],
    [255, 13, 99, 42],
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 3],
]
FAMILIES = ("llama", "mistral", "qwen2")
SEED = 5  # of the random GPTModel / GPTPipe


def make_hf_model(family: str, folder: Path):
    """The converter tests' tiny random ``family`` folder (a different draw per family), with
    more noise on every weight: sharp logits, clear argmax margins, varied continuations."""
    model = make_hf_llama(folder, family, seed=FAMILIES.index(family))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    model.save_pretrained(folder)  # over the first save (the tokenizer files stay)
    return model


def hf_batch_greedy(model, prompts=PROMPTS, new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """transformers' greedy generation of the prompts as one left-padded batch, each
    continuation cut after its first EOS (what our engine returns)."""
    n = max(map(len, prompts))
    ids = torch.full((len(prompts), n), EOS, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :] = torch.tensor(p)
        mask[i, n - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=EOS,
            eos_token_id=EOS,
        )
    res = []
    for row in out[:, n:].tolist():
        res.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return res


# ---- random Llama-style models built by our own GPTModel (no transformers involved) ----------

VARIANTS = {
    # Llama: GQA 4 heads / 2 groups, RoPE, RMSNorm, SwiGLU, untied, no biases
    "gqa": dict(num_query_groups=2),
    # MQA (one group: replicated over TP 2), half the channels rotated, a QKV bias only
    "mqa_partial": dict(num_query_groups=1, rotary_percent=0.5, add_qkv_bias=True),
}


def llama_config(variant: str):
    from mtnlg.config import ModelConfig

    return ModelConfig(
        num_layers=3,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=64,
        vocab_size=300,
        ffn_hidden_size=96,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.2,  # sharp logits: clear argmax margins
        position_embedding_type="rope",
        rotary_base=5000.0,
        normalization="rmsnorm",
        swiglu=True,
        untie_embeddings_and_output_weights=True,
        add_bias_linear=False,
        **VARIANTS[variant],
    )


def random_model(variant: str):
    """(config, the seeded TP1 ``GPTModel`` in eval mode, its full state)."""
    from mtnlg.checkpoint import merge_state
    from mtnlg.model.gpt import GPTModel

    cfg = llama_config(variant)
    model = GPTModel(cfg, seed=SEED).eval()
    return cfg, model, merge_state([model.state_dict()], cfg)


def full_forward_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS):
    """The reference: argmax of our full (uncached, unpadded) forward of the prefix, step by
    step, for one prompt alone -> (tokens, (new_tokens, V) logits)."""
    ids, logits = list(prompt), []
    for _ in range(new_tokens):
        row = model.full_logits(torch.tensor([ids]))[0, -1]  # (V,)
        logits.append(row)
        ids.append(int(row.argmax()))
    return ids[len(prompt) :], torch.stack(logits)


def requests(new_tokens: int = NEW_TOKENS):
    from mtnlg.inference import Request, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, greedy=True)
    return [Request(tuple(p), params) for p in PROMPTS]


def _run(eng) -> dict:
    res = eng.generate(requests(), batch_size=len(PROMPTS), return_logits=True)
    out = {"tokens": [r.tokens for r in res], "last": eng.is_last_stage}
    if eng.is_last_stage:
        out["logits"] = [torch.stack(r.logits) for r in res]
    return out


def tp2pp2_body(rank, world_size, hf_folders: dict, ckpts: dict):
    """On 4 ranks at TP2 x PP2: greedy generation (one left-padded batch) of every random
    variant (cut from the TP1 full state), of the "gqa" one on the modules of its pipeline
    form (``GPTPipe``, same seed, as evaluation shares a training engine's modules), every HF
    folder (read directly) and every converted mtnlg checkpoint (saved at TP2 x PP2: each rank
    reads its own files)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from mtnlg.distributed.topology import ParallelDims, Topology
    from mtnlg.evaluation.shared_stage import stage_from_engine
    from mtnlg.inference import Groups, InferenceEngine
    from mtnlg.inference.stage import stage_from_full
    from mtnlg.model.pipe import GPTPipe

    topo = Topology(ParallelDims(world_size=world_size, tp=2, pp=2))
    groups = Groups.from_topology(topo)
    out = {}
    for variant in VARIANTS:
        cfg, _, full = random_model(variant)
        stage = stage_from_full(
            cfg, full, tp_group=groups.tp_group, stage=groups.stage, pp=groups.pp
        )
        out[variant] = _run(InferenceEngine(stage, groups))
    pipe = GPTPipe(llama_config("gqa"), topo, seed=SEED)
    stage = stage_from_engine(SimpleNamespace(module=pipe), topo)  # duck-typed engine
    out["gqa_pipe"] = _run(InferenceEngine(stage, groups))
    for name, path in [*hf_folders.items(), *ckpts.items()]:
        out[name] = _run(InferenceEngine.load(path, groups))  # EOS: the tokenizer's
        dist.barrier()
    return out
