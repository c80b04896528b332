"""Importance scores: the same at TP2 x PP2 as at TP1, and equal to an independent computation
with forward hooks on the ``transformers`` model of the Hugging Face export (GPT-2, Llama GQA)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from tests.compression.conftest import CALIB_SAMPLES, SEQ, calib_argv
from tests.helpers.dist import run_distributed


def _prune_py(rank, world, argv):
    from mtnlg.compression.run import run

    run(argv)


def calibrate(model: dict, ckpt: str, out, world: int, extra=()) -> dict:
    from mtnlg.compression.scores import load_scores

    argv = calib_argv(model, ckpt, out, *extra)
    run_distributed(_prune_py, world, args=(argv,), timeout=300, start_method="forkserver")
    return load_scores(out)[0]


def _windows(model: dict):
    from mtnlg.compression.calibration import calibration_windows
    from mtnlg.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model["tp1"] / "iter_0000000" / "tokenizer")
    windows, _ = calibration_windows(str(model["dir"] / "calib.txt"), tok, SEQ, CALIB_SAMPLES)
    assert len(windows) == CALIB_SAMPLES
    return windows


def _modules(hf, name: str):
    """(blocks, [(attention out proj, mlp down proj, norm 1, norm 2)], final norm) by family."""
    if name == "gpt2":
        blocks = list(hf.transformer.h)
        parts = [(b.attn.c_proj, b.mlp.c_proj, b.ln_1, b.ln_2) for b in blocks]
        return blocks, parts, hf.transformer.ln_f
    blocks = list(hf.model.layers)
    parts = [(b.self_attn.o_proj, b.mlp.down_proj, b.input_layernorm, b.post_attention_layernorm)
             for b in blocks]  # fmt: skip
    return blocks, parts, hf.model.norm


@torch.no_grad()
def hf_reference(model: dict, export_dir, windows) -> dict:
    """The Minitron formulas, written here: per sample mean |x| over the sequence, squared,
    summed over samples, square root; heads = L2 over their channels; hidden = sum over every
    norm's output; block importance = 1 - mean cos(block input, block output)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    nh = hf.config.num_attention_heads
    sums: dict[str, torch.Tensor] = defaultdict(lambda: 0.0)
    cos: dict[int, list] = defaultdict(list)
    blocks, parts, final = _modules(hf, model["name"])
    hooks = []

    def channel(key):
        def add(x):
            sums[key] = sums[key] + x[0].double().abs().mean(0).square()  # one sample: (C,)

        return add

    for i, (att, mlp, n1, n2) in enumerate(parts):
        hooks.append(att.register_forward_pre_hook(lambda m, a, f=channel(f"att{i}"): f(a[0])))
        hooks.append(mlp.register_forward_pre_hook(lambda m, a, f=channel(f"mlp{i}"): f(a[0])))
        for j, n in enumerate((n1, n2)):
            hooks.append(n.register_forward_hook(lambda m, a, y, f=channel(f"n{i}.{j}"): f(y)))
    hooks.append(final.register_forward_hook(lambda m, a, y, f=channel("final"): f(y)))
    for i, b in enumerate(blocks):
        store = {}
        hooks.append(b.register_forward_pre_hook(
            lambda m, a, kw, s=store: s.update(x=a[0] if a else kw["hidden_states"]),
            with_kwargs=True,
        ))  # fmt: skip

        def post(m, a, kw, y, s=store, i=i):
            out = y[0] if isinstance(y, tuple) else y
            cos[i].append(F.cosine_similarity(s["x"].double(), out.double(), dim=-1).reshape(-1))

        hooks.append(b.register_forward_hook(post, with_kwargs=True))
    for w in windows:
        hf(torch.as_tensor(w[:-1])[None])
    for h in hooks:
        h.remove()
    L = len(blocks)
    ref = {"hidden": sum(sums[k].sqrt() for k in sums if k[0] in "nf")}
    ref["block_importance"] = torch.stack([1 - torch.cat(cos[i]).mean() for i in range(L)])
    for i in range(L):
        ref[f"layers.{i}.attention"] = sums[f"att{i}"].sqrt()
        ref[f"layers.{i}.heads"] = sums[f"att{i}"].sqrt().view(nh, -1).norm(dim=-1)
        ref[f"layers.{i}.mlp"] = sums[f"mlp{i}"].sqrt()
    return ref


@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scores_tp2pp2_equal_tp1_and_transformers(family, request, tmp_path):
    from mtnlg.checkpoint.convert import mtnlg_to_hf

    model = request.getfixturevalue(family)
    tp1 = calibrate(model, "tp1", tmp_path / "tp1.safetensors", 1)
    tp2pp2 = calibrate(model, "tp2pp2", tmp_path / "tp2pp2.safetensors", 4)
    dp2 = calibrate(model, "tp1", tmp_path / "dp2.safetensors", 2)  # TP1 x DP2: samples split
    assert set(tp1) == set(tp2pp2) == set(dp2)
    for k in tp1:
        torch.testing.assert_close(tp2pp2[k], tp1[k], rtol=1e-5, atol=1e-8, msg=k)
        torch.testing.assert_close(dp2[k], tp1[k], rtol=1e-5, atol=1e-8, msg=k)
    mtnlg_to_hf(str(model["tp2pp2"]), str(tmp_path / "hf"))
    ref = hf_reference(model, tmp_path / "hf", _windows(model))
    assert set(ref) == set(tp1)
    for k in ref:
        torch.testing.assert_close(tp1[k], ref[k].double(), rtol=1e-4, atol=1e-7, msg=k)
    # the scores are informative: not constant, and every layer's importance positive
    assert tp1["block_importance"].min() > 0 and tp1["layers.0.mlp"].std() > 0
