"""Sliding-window attention (Mistral v0.1; Qwen2 with every layer sliding) against
``transformers``: logits of a 24-token input and greedy generation of prompts longer than the
window (4), at TP1 and from a TP2 x PP2 checkpoint; the export carries the window back. A window
in some layers only is refused by name (tests/checkpoint/test_llama_convert.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtnlg.checkpoint import load_full_state, load_into_model
from mtnlg.checkpoint.convert import hf_to_mtnlg, mtnlg_to_hf
from mtnlg.model import GPTModel
from tests.checkpoint.llama_models import FAMILIES, VOCAB, hf_config, write_tokenizer
from tests.helpers.dist import run_distributed
from tests.inference.gen_helpers import hf_greedy
from tests.inference.llama_helpers import EOS, NEW_TOKENS, PROMPTS, requests

WINDOW = 4
WINDOWED = {
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0},
}


def _make(folder: Path, family: str, seed: int, **overrides):
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][1])(hf_config(family, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.eval().save_pretrained(folder)
    write_tokenizer(folder)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("swa")
    return {f: (root / f, _make(root / f, f, 3, **WINDOWED[f])) for f in WINDOWED}


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family", list(WINDOWED))
def test_logits_equal_transformers_beyond_the_window(models, family, tmp_path):
    folder, hf = models[family]
    with torch.no_grad():
        want = hf(IDS).logits
        full = _make(tmp_path / "full", family, 3)(IDS).logits  # the same weights, no window
    assert (want - full).abs().max() > 1e-2  # the window masks something at 24 tokens
    cfg, state, _ = load_full_state(folder)
    assert cfg.sliding_window == WINDOW
    model = GPTModel(cfg).eval()
    load_into_model(model, state, 1, 0)
    torch.testing.assert_close(model.full_logits(IDS), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", list(WINDOWED))
def test_greedy_generation_equals_transformers(models, family):
    from mtnlg.inference import Groups, InferenceEngine

    folder, hf = models[family]
    ref = [hf_greedy(hf, p, NEW_TOKENS, EOS) for p in PROMPTS]
    assert max(len(p) + len(t) for p, t in zip(PROMPTS, ref)) > 3 * WINDOW
    res = InferenceEngine.load(folder, Groups()).generate(requests(), batch_size=4)
    assert [r.tokens for r in res] == ref


@pytest.mark.parametrize("family", list(WINDOWED))
def test_export_carries_the_window(models, family, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, hf = models[family]
    hf_to_mtnlg(str(folder), str(tmp_path / "ck"), 1, 1, make_vocab_size_divisible_by=4)
    mtnlg_to_hf(str(tmp_path / "ck"), str(tmp_path / "hf"))
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["sliding_window"] == WINDOW
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, hf(IDS).logits, atol=1e-5, rtol=0)


def _tp2pp2(rank, world_size, ckpt):
    from mtnlg.distributed import ParallelDims, Topology
    from mtnlg.inference import Groups, InferenceEngine

    topo = Topology(ParallelDims(world_size=4, tp=2, pp=2))
    eng = InferenceEngine.load(ckpt, Groups.from_topology(topo))
    return [r.tokens for r in eng.generate(requests(), batch_size=4)]


@pytest.mark.timeout(300)
def test_greedy_generation_tp2pp2(models, tmp_path):
    folder, hf = models["mistral"]
    ckpt = tmp_path / "tp2pp2"
    hf_to_mtnlg(str(folder), str(ckpt), 2, 2, make_vocab_size_divisible_by=4)
    ref = [hf_greedy(hf, p, NEW_TOKENS, EOS) for p in PROMPTS]
    outs = run_distributed(_tp2pp2, 4, args=(str(ckpt),), timeout=240)
    assert all(out == ref for out in outs), outs
