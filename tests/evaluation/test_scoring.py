"""score_continuations at TP2 x PP2, at DP 2 (uneven shards) with PP=1 and with PP=2, equals
transformers' log-softmax on the HF model the checkpoints were converted from (1e-5)."""

from __future__ import annotations

import random

import pytest
import torch

from mtnlg.checkpoint.convert import hf_to_mtnlg
from tests.helpers.dist import run_distributed
from tests.inference.gen_helpers import hf_greedy, make_hf_gpt2

SEQ = 32
LAYOUTS = {"tp2pp2": (2, 2, 1), "tp2dp2": (2, 1, 2), "pp2dp2": (1, 2, 2)}  # tp, pp, micro batch


def _pairs(model) -> list[tuple[list[int], list[int]]]:
    """Contexts and continuations of many lengths: random ones (greedy False), the model's own
    greedy continuations (greedy True), high ids (the last TP shard), one left-truncated."""
    rng = random.Random(0)
    pairs = []
    for n_ctx, n_cont in [(5, 1), (1, 3), (12, 4), (20, 2), (3, 7)]:
        pairs.append(
            (
                [rng.randrange(5000) for _ in range(n_ctx)],
                [rng.randrange(5000) for _ in range(n_cont)],
            )
        )
    for n_ctx, n_cont in [(6, 3), (2, 1), (9, 5)]:
        ctx = [rng.randrange(5000) for _ in range(n_ctx)]
        pairs.append((ctx, hf_greedy(model, ctx, n_cont)))
    pairs.append(([4999, 4998, 4990], [4995, 4999]))
    pairs.append(
        ([rng.randrange(5000) for _ in range(30)], [rng.randrange(5000) for _ in range(9)])
    )
    return pairs


def _reference(model, pairs) -> list[tuple[list[float], bool]]:
    out = []
    for ctx, cont in pairs:
        toks = (ctx + cont)[-(SEQ + 1) :]
        with torch.no_grad():
            logits = model(torch.tensor([toks[:-1]])).logits[0].double()  # (n, V)
        logp = torch.log_softmax(logits, -1)[-len(cont) :]  # (c, V)
        target = torch.tensor(cont)
        nll = (-logp.gather(-1, target[:, None])[:, 0]).tolist()
        out.append((nll, bool((logp.argmax(-1) == target).all())))
    return out


def _body(rank, world_size, ckpts, pairs):
    from mtnlg.config import ModelConfig
    from mtnlg.distributed.topology import ParallelDims, Topology
    from mtnlg.evaluation.loading import eval_engine
    from mtnlg.evaluation.scoring import score_continuations
    from mtnlg.training.checkpointing import read_meta

    out = {}
    for name, (tp, pp, micro) in LAYOUTS.items():
        cfg = ModelConfig.from_dict(read_meta(ckpts[name])["model"])
        topo = Topology(ParallelDims(world_size=world_size, tp=tp, pp=pp))
        engine = eval_engine(cfg, topo, ckpts[name], micro_batch=micro)
        out[name] = score_continuations(engine, topo, pairs, SEQ, micro_batch=micro)
        if name == "tp2pp2":  # the engine is left usable: a second call gives the same
            again = score_continuations(engine, topo, pairs[:3], SEQ, micro_batch=2)
            out["again"] = again
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    model = make_hf_gpt2(root / "hf")
    ckpts = {}
    for name, (tp, pp, _) in LAYOUTS.items():
        ckpts[name] = str(root / name)
        hf_to_mtnlg(str(root / "hf"), ckpts[name], tp=tp, pp=pp)
    pairs = _pairs(model)
    results = run_distributed(
        _body, world_size=4, args=(ckpts, pairs), timeout=300, start_method="forkserver"
    )
    return pairs, _reference(model, pairs), results


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scores_equal_transformers(runs, layout):
    pairs, ref, results = runs
    greedy = [g for _, g in ref]
    assert any(greedy) and not all(greedy)  # both outcomes are exercised
    for rank, out in enumerate(results):
        got = out[layout]
        assert len(got) == len(pairs)
        for i, (s, (nll, g)) in enumerate(zip(got, ref)):
            where = f"{layout} rank {rank} pair {i}"
            assert s.tokens == len(pairs[i][1]) == len(s.token_nll), where
            torch.testing.assert_close(s.token_nll, nll, rtol=0, atol=1e-5, msg=where)
            assert abs(s.nll - sum(nll)) < 1e-5, where
            assert s.greedy == g, where


def test_engine_reusable_with_other_shapes(runs):
    _, _, results = runs
    for out in results:
        for a, b in zip(out["again"], out["tp2pp2"][:3]):
            assert a.token_nll == pytest.approx(b.token_nll, abs=1e-6)


def test_bad_pairs_refused():
    from mtnlg.evaluation.scoring import _rows

    with pytest.raises(ValueError, match="pair 1: empty continuation"):
        _rows([([1], [2]), ([1], [])], SEQ)
    with pytest.raises(ValueError, match="pair 0: empty context"):
        _rows([([], [2])], SEQ)
    with pytest.raises(ValueError, match="continuation of 33 tokens"):
        _rows([([1], list(range(33)))], SEQ)
    assert _rows([(list(range(40)), [7, 8])], SEQ) == [list(range(9, 40)) + [7, 8]]
