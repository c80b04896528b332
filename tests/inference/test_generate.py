"""Generation equals transformers at every layout; the KV cache equals recomputation; seeded
sampling is layout-independent. References: transformers' own generate and forward."""

from __future__ import annotations

import pytest
import torch

from mtnlg.checkpoint.convert import hf_to_mtnlg
from mtnlg.inference import Groups, InferenceEngine, Request, SamplingParams
from tests.helpers.dist import run_distributed
from tests.inference.gen_helpers import (
    EOD,
    NEW_TOKENS,
    PROMPTS,
    _requests,
    hf_greedy,
    layouts_body,
)

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}


@pytest.fixture(scope="module")
def layout_runs(hf_model, tmp_path_factory):
    folder, _ = hf_model
    root = tmp_path_factory.mktemp("ckpts")
    ckpts = {}
    for name, (tp, pp) in LAYOUTS.items():
        ckpts[name] = str(root / name)
        hf_to_mtnlg(str(folder), ckpts[name], tp=tp, pp=pp)
    return run_distributed(
        layouts_body, world_size=4, args=(ckpts,), timeout=240, start_method="forkserver"
    )


@pytest.fixture(scope="module")
def hf_refs(hf_model):
    _, model = hf_model
    return [hf_greedy(model, p) for p in PROMPTS]


@pytest.mark.parametrize("layout", [*LAYOUTS, "tp2pp2_from_tp2"])
def test_greedy_equals_transformers(layout_runs, hf_refs, layout):
    """Each prompt's 32 greedy tokens, batched with prompts of other lengths, equal
    transformers' generate of that prompt alone; on every rank of every layout."""
    for rank, out in enumerate(layout_runs):
        got = out[layout]["greedy"]
        for i, (g, ref) in enumerate(zip(got, hf_refs)):
            assert g == ref, f"{layout} rank {rank} prompt {i}: {g} != transformers {ref}"


def test_cached_logits_equal_full_forward(layout_runs, hf_model, hf_refs):
    """Every step's logits (TP1 and TP2 x PP2, with the cache) equal a no-cache forward of the
    prefix: our recomputing path (1e-5) and transformers' forward (1e-5)."""
    _, model = hf_model
    last = [out for out in layout_runs if out["tp2pp2"]["last"]]
    assert len(last) == 2  # the two TP ranks of the last stage
    for out in last:
        for cached, nocache in zip(out["tp2pp2"]["logits"], out["tp2pp2"]["nocache_logits"]):
            torch.testing.assert_close(cached, nocache, rtol=0, atol=1e-5)
        assert out["tp2pp2"]["nocache_greedy"] == hf_refs
    for layout in ("tp1", "tp2pp2"):
        steps = next(o[layout]["logits"] for o in layout_runs if o[layout]["last"])
        for prompt, gen, logits in zip(PROMPTS, hf_refs, steps):
            with torch.no_grad():
                ref = model(torch.tensor([prompt + gen])).logits[0]  # (s, V)
            n = len(prompt)
            torch.testing.assert_close(logits, ref[n - 1 : n - 1 + len(gen)], rtol=0, atol=1e-5)


def test_seeded_sampling_same_at_tp1_and_tp2pp2(layout_runs):
    ref = layout_runs[0]["tp1"]["sampled"]
    for rank, out in enumerate(layout_runs):
        assert out["tp1"]["sampled"] == ref, f"TP1 on rank {rank}"
        assert out["tp2pp2"]["sampled"] == ref, f"TP2 x PP2 rank {rank}"
    assert ref != layout_runs[0]["tp1"]["greedy"]  # it did sample


@pytest.fixture(scope="module")
def engine(hf_model):
    """TP1 in this process, one intra-op thread (the CI machine has two cores)."""
    folder, _ = hf_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield InferenceEngine.load(folder, Groups())
    torch.set_num_threads(threads)


def test_sampling_independent_of_batch(engine):
    """A seeded request gives the same tokens alone and inside a batch; other seeds differ."""
    reqs = _requests(greedy=False, seed=3)
    batched = [r.tokens for r in engine.generate(reqs, batch_size=4)]
    alone = [engine.generate([r])[0].tokens for r in reqs]
    assert batched == alone
    other = [r.tokens for r in engine.generate(_requests(greedy=False, seed=4), batch_size=4)]
    assert other != batched


def test_eod_ends_sequence_like_transformers(engine, hf_model):
    """With a token of the greedy output as end-of-sequence, generation stops where
    transformers does (and every prompt, stopped or not, matches it)."""
    _, model = hf_model
    plain = [hf_greedy(model, p) for p in PROMPTS]
    i, k = next(
        (i, k) for i, g in enumerate(plain) for k in range(3, NEW_TOKENS) if g[k] not in g[:k]
    )
    eod = plain[i][k]
    refs = [hf_greedy(model, p, eos=eod) for p in PROMPTS]
    eng = InferenceEngine(engine.model, engine.groups, engine.tokenizer, eod=eod)
    res = eng.generate(_requests(), batch_size=4)
    assert [r.tokens for r in res] == refs
    assert res[i].finish_reason == "eod" and res[i].tokens == plain[i][: k + 1]
    assert eng.tokenizer.detokenize(res[i].tokens[:-1]) == res[i].text


def test_stop_string_cuts_text(engine):
    full = engine.generate(_requests()[:1])[0]
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    first = text.find(stop)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True, stop=("\x00never", stop))
    res = engine.generate([Request(tuple(PROMPTS[0]), params)])[0]
    assert res.finish_reason == "stop"
    assert res.text == text[:first]
    assert full.tokens[: len(res.tokens)] == res.tokens and len(res.tokens) < NEW_TOKENS


def test_refusals(engine):
    limit = engine.cfg.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate([Request((1,) * (limit - 4), SamplingParams(max_new_tokens=5))])
    with pytest.raises(ValueError, match="request 1: empty prompt"):
        engine.generate([Request((1,)), Request(())])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([Request((EOD + 1,))])
    with pytest.raises(ValueError, match="--top-p"):
        SamplingParams(top_p=0.0)
