"""``sample`` on extreme inputs: tiny temperatures, huge or non-finite logits, degenerate top-p
and top-k. It never returns an out-of-vocabulary index: a valid token, or ``INVALID`` for a row
whose logits are unusable (the engine then ends only that sequence, with ``"error"``)."""

from __future__ import annotations

import math

import pytest
import torch

from mtnlg.inference.params import MIN_TEMPERATURE, Request, SamplingParams
from mtnlg.inference.sampling import INVALID, sample, usable_rows

V = 50
INF, NAN = math.inf, math.nan


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _rows(seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(8, V, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("temperature", [1e-38, 5e-324, 1e-30, 1e-6, MIN_TEMPERATURE / 2])
def test_temperature_below_the_minimum_is_greedy(temperature):
    p = SamplingParams(temperature=temperature, top_k=10, top_p=0.5)
    assert p.is_greedy
    logits = _rows(1, scale=1e30)  # l / 1e-38 would be inf: the old sampler indexed -1 here
    assert torch.equal(sample(logits, [p] * 8, _gens(8)), logits.argmax(-1))


@pytest.mark.parametrize("scale", [1.0, 1e4, 1e30, 3.3e38])
def test_minimum_temperature_is_sampled_finitely(scale):
    """T = MIN_TEMPERATURE is sampled (not greedy) and gives the argmax of well-separated
    logits, even of logits near float32's largest value (their differences overflow)."""
    p = SamplingParams(temperature=MIN_TEMPERATURE)
    assert not p.is_greedy
    logits = _rows(2)
    logits = logits / logits.abs().max() * scale  # distinct; the largest at +-scale
    for seed in range(5):
        assert torch.equal(sample(logits, [p] * 8, _gens(8, seed)), logits.argmax(-1))


def test_extreme_temperature_keeps_a_distribution():
    p = SamplingParams(temperature=1e300)  # finite: every token equally likely
    toks = sample(torch.zeros(4000, V) + torch.arange(V), [p] * 4000, _gens(4000))
    assert 0 <= int(toks.min()) and int(toks.max()) < V
    assert len(set(toks.tolist())) > V // 2


@pytest.mark.parametrize("params", [SamplingParams(greedy=True), SamplingParams(temperature=0.7)])
def test_non_finite_rows(params):
    """-inf entries are masked tokens; NaN, +inf or an all -inf row gives INVALID, and the
    other rows of the batch are unaffected."""
    logits = _rows(3)
    logits[0, :40] = -INF  # fine: among the last 10
    logits[1, 7] = NAN
    logits[2, 3] = INF
    logits[3, :] = -INF
    logits[4, :] = NAN
    logits[5, 2], logits[5, 9] = INF, -INF
    gens = _gens(8)
    alone = sample(logits[6:], [params] * 2, _gens(2, 6))
    got = sample(logits, [params] * 8, gens)
    assert 40 <= int(got[0]) < V
    assert got[1:6].tolist() == [INVALID] * 5
    assert got[6:].tolist() == alone.tolist()
    assert usable_rows(logits).tolist() == [True, False, False, False, False, False, True, True]


def test_only_the_best_token_survives_degenerate_filters():
    logits = _rows(4)
    argmax = logits.argmax(-1)
    for p in (
        SamplingParams(top_k=1, temperature=2.0),
        SamplingParams(top_p=1e-300),
        SamplingParams(top_p=5e-324, top_k=3),
        SamplingParams(top_p=1e-9, temperature=1e6),
    ):
        for seed in range(5):
            assert torch.equal(sample(logits, [p] * 8, _gens(8, seed)), argmax)


def test_huge_top_k_and_ties():
    """top_k above the vocabulary (even past int64) means all tokens; equal logits are a
    uniform choice among them."""
    p = SamplingParams(top_k=10**30)
    toks = sample(torch.zeros(3000, V), [p] * 3000, _gens(3000))
    freq = torch.bincount(toks, minlength=V).float() / 3000
    assert freq.min() > 0.005 and freq.max() < 0.04


def test_bad_parameters_are_refused():
    for kw in (
        {"temperature": NAN},
        {"temperature": INF},
        {"temperature": -1e-9},
        {"top_p": NAN},
        {"top_p": 0.0},
        {"top_k": -1},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_engine_ends_only_the_unusable_sequence(monkeypatch):
    """The engine turns INVALID into finish_reason "error" for that sequence alone and never
    feeds -1 to the embedding; the other sequence of the batch is as generated alone."""
    from mtnlg.inference import engine as engine_mod

    eng = engine_mod.InferenceEngine.__new__(engine_mod.InferenceEngine)
    real = engine_mod.sample
    seen = []

    def poisoned(logits, params, gens):
        seen.append(logits.shape[0])
        logits = logits.clone()
        for i, p in enumerate(params):
            if p.seed == 666:
                logits[i, 5] = NAN
        return real(logits, params, gens)

    class Tiny(torch.nn.Module):  # stands in for the stage: logits from the last token id
        def forward(self, ids):
            return torch.nn.functional.one_hot((ids[:, -1] * 7 + 3) % V, V).float() * 5

    tiny = Tiny()
    eng.cfg = type("C", (), {"max_position_embeddings": 64, "vocab_size": V})()
    eng.tokenizer, eng.eod, eng.device, eng.dtype = None, None, torch.device("cpu"), torch.float32
    eng._pp_ranks, eng._stage = [0], 0
    eng.groups = engine_mod.Groups()
    monkeypatch.setattr(eng, "_forward", lambda ids, *a: tiny(ids), raising=False)
    monkeypatch.setattr(engine_mod, "sample", poisoned)
    good = Request((1, 2), SamplingParams(max_new_tokens=4, temperature=0.5, seed=1))
    bad = Request((1, 2), SamplingParams(max_new_tokens=4, temperature=0.5, seed=666))
    both = eng.generate([bad, good], batch_size=2, use_cache=False)
    alone = eng.generate([good], batch_size=1, use_cache=False)
    assert both[0].finish_reason == "error" and both[0].text is None and both[0].tokens == []
    assert both[1].tokens == alone[0].tokens and len(alone[0].tokens) == 4
    assert all(0 <= t < V for r in both + alone for t in r.tokens)
