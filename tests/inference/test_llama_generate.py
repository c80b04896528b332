"""Generation of Llama-family models (RoPE positions in the KV cache, GQA/MQA caches of the
local KV heads, RMSNorm, SwiGLU, untied output layer, no biases) at TP1 and TP2 x PP2, prompts
of different lengths left-padded in one batch.

References, never our generation code: our own full forward (``GPTModel.full_logits`` of the
unpadded prefix, no cache) for random models built by ``GPTModel``; transformers' ``generate``
and forward for tiny random Llama / Mistral / Qwen2 models (4 query heads, 2 KV groups)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mtnlg.checkpoint import load_into_model
from mtnlg.checkpoint.convert import hf_to_mtnlg
from mtnlg.evaluation.shared_stage import stage_from_engine
from mtnlg.inference import Groups, InferenceEngine
from mtnlg.inference.stage import stage_from_full
from mtnlg.model.gpt import GPTModel
from tests.helpers.dist import run_distributed
from tests.inference.gen_helpers import hf_greedy
from tests.inference.llama_helpers import (
    EOS,
    FAMILIES,
    NEW_TOKENS,
    PROMPTS,
    VARIANTS,
    full_forward_greedy,
    hf_batch_greedy,
    make_hf_model,
    random_model,
    requests,
    tp2pp2_body,
)


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine has two cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_refs(one_thread):
    """Per variant: (config, full state, per-prompt (tokens, logits) of the full forward)."""
    refs = {}
    for variant in VARIANTS:
        cfg, model, full = random_model(variant)
        with torch.no_grad():
            refs[variant] = (cfg, full, [full_forward_greedy(model, p) for p in PROMPTS])
    return refs


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, one_thread):
    """Per family: (saved folder, model, transformers' greedy tokens of the left-padded batch)."""
    root = tmp_path_factory.mktemp("hf_llama")
    out = {}
    for family in FAMILIES:
        model = make_hf_model(family, root / family)
        out[family] = (root / family, model, hf_batch_greedy(model))
    return out


@pytest.fixture(scope="module")
def tp2pp2_runs(hf_models, tmp_path_factory):
    """One 4-rank run at TP2 x PP2: the random variants, the three HF folders read directly,
    and the Llama folder converted to an mtnlg checkpoint saved at TP2 x PP2."""
    folders = {f: str(folder) for f, (folder, _, _) in hf_models.items()}
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "llama_tp2pp2")
    hf_to_mtnlg(folders["llama"], ckpt, tp=2, pp=2)
    return run_distributed(
        tp2pp2_body,
        world_size=4,
        args=(folders, {"ckpt": ckpt}),
        timeout=300,
        start_method="forkserver",
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_equals_full_forward_tp1(random_refs, variant):
    """Cached incremental generation (left-padded batch) = argmax of the full forward of each
    prompt alone at every step; the logits (of order 1-10) agree to 1e-4; so does the no-cache path."""
    cfg, full, refs = random_refs[variant]
    eng = InferenceEngine(stage_from_full(cfg, full), Groups())
    for use_cache in (True, False):
        res = eng.generate(requests(), batch_size=4, use_cache=use_cache, return_logits=True)
        for i, (r, (tokens, logits)) in enumerate(zip(res, refs)):
            assert r.tokens == tokens, f"use_cache={use_cache} prompt {i}"
            torch.testing.assert_close(torch.stack(r.logits), logits, rtol=0, atol=1e-4)


def test_shared_engine_modules_tp1(random_refs):
    """Generation on the modules of a training model (``stage_from_engine`` at PP=1 takes the
    untied ``output_layer`` of the ``GPTModel``) equals the full forward."""
    cfg, full, refs = random_refs["gqa"]
    model = GPTModel(cfg)
    load_into_model(model, full, tp=1, tp_rank=0)
    topo = SimpleNamespace(tp_group=None, pp_rank=0, pp=1)  # what stage_from_engine reads
    stage = stage_from_engine(SimpleNamespace(module=model), topo)
    res = InferenceEngine(stage, Groups()).generate(requests(), batch_size=4)
    assert [r.tokens for r in res] == [t for t, _ in refs]


@pytest.mark.parametrize("variant", [*VARIANTS, "gqa_pipe"])
def test_cache_equals_full_forward_tp2pp2(tp2pp2_runs, random_refs, variant):
    """The same at TP2 x PP2 (MQA: one KV group replicated over the two TP ranks; gqa_pipe:
    on the modules of the pipeline form built with the same seed)."""
    refs = random_refs[variant.removesuffix("_pipe")][2]
    for rank, out in enumerate(tp2pp2_runs):
        assert out[variant]["tokens"] == [t for t, _ in refs], f"rank {rank}"
        if out[variant]["last"]:
            for got, (_, logits) in zip(out[variant]["logits"], refs):
                torch.testing.assert_close(got, logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_tp1(hf_models, family):
    """The HF folder loaded at TP1: tokens = transformers' generate of the same left-padded
    batch and of each prompt alone; each step's logits = transformers' forward (1e-4)."""
    folder, model, ref = hf_models[family]
    assert ref == [hf_greedy(model, p, NEW_TOKENS, EOS) for p in PROMPTS]
    assert any(len(t) == NEW_TOKENS for t in ref)
    eng = InferenceEngine.load(folder, Groups())
    assert eng.eod == EOS  # from the folder's tokenizer
    res = eng.generate(requests(), batch_size=4, return_logits=True)
    assert [r.tokens for r in res] == ref
    for prompt, r in zip(PROMPTS, res):
        with torch.no_grad():
            hf = model(torch.tensor([prompt + r.tokens])).logits[0]  # (s, V)
        n = len(prompt)
        torch.testing.assert_close(
            torch.stack(r.logits), hf[n - 1 : n - 1 + len(r.tokens)], rtol=0, atol=1e-4
        )


@pytest.mark.parametrize("name", [*FAMILIES, "ckpt"])
def test_greedy_equals_transformers_tp2pp2(tp2pp2_runs, hf_models, name):
    """At TP2 x PP2 every rank has transformers' tokens: HF folders re-cut on load, and the
    converted Llama checkpoint read from its own TP2 x PP2 files (untied output layer L+2)."""
    ref = hf_models["llama" if name == "ckpt" else name][2]
    for rank, out in enumerate(tp2pp2_runs):
        assert out[name]["tokens"] == ref, f"{name} rank {rank}"
    assert sum(out[name]["last"] for out in tp2pp2_runs) == 2
