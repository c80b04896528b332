"""Continuous batching (mtnlg.inference.batching): sequences admitted into a running batch,
between decode steps, into 3 slots, get exactly the tokens and log-probabilities each gets
alone from ``InferenceEngine.generate`` (and, greedy, from transformers), at TP1, TP2, PP2 and
TP2 x PP2; a slot freed by an ending or an abort is reused."""

from __future__ import annotations

import pytest
import torch

from mtnlg.checkpoint.convert import hf_to_mtnlg
from tests.helpers.dist import run_distributed
from tests.inference.gen_helpers import EOD, PROMPTS, hf_greedy

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}
ARRIVAL = [0, 0, 1, 3, 3, 4, 9, 9]
"""The step at which each request reaches the queue."""


def _requests():
    """Eight requests: greedy and sampled, different lengths, logprobs, a stop string, one
    with prompt logprobs, one ending after its first token."""
    from mtnlg.inference import Request, SamplingParams

    sp = SamplingParams
    return [
        Request(tuple(PROMPTS[0]), sp(max_new_tokens=12, greedy=True, logprobs=3)),
        Request(tuple(PROMPTS[1]), sp(max_new_tokens=20, greedy=True)),
        Request(tuple(PROMPTS[2]), sp(max_new_tokens=9, temperature=0.9, top_k=50, seed=5)),
        Request(tuple(PROMPTS[3]), sp(max_new_tokens=1, greedy=True, logprobs=0)),
        Request(tuple(PROMPTS[2]), sp(max_new_tokens=15, greedy=True, prompt_logprobs=2)),
        Request(tuple(PROMPTS[3]), sp(max_new_tokens=14, temperature=1.0, top_p=0.8, seed=9)),
        Request(tuple(PROMPTS[0][:3]), sp(max_new_tokens=10, greedy=True, logprobs=5)),
        Request(tuple(PROMPTS[1]), sp(max_new_tokens=18, temperature=0.7, seed=3)),
    ]


def _drive(batcher, requests, abort_at: dict[int, int] | None = None) -> dict:
    """Run the batcher over ARRIVAL's schedule (every rank alike): admit into free slots in
    arrival order; ``abort_at`` {request: step} aborts a request. Events per request."""
    from mtnlg.inference.batching import Plan

    events: dict[int, list] = {i: [] for i in range(len(requests))}
    waiting, admitted, step = [], set(), 0
    while len(admitted) < len(requests) or batcher.running:
        waiting += [i for i, a in enumerate(ARRIVAL) if a == step]
        plan = Plan(abort=[i for i, s in (abort_at or {}).items() if s == step and i in admitted])
        free = list(batcher.free)
        while waiting and free:
            i = waiting.pop(0)
            plan.admit.append((i, free.pop(), requests[i]))
            admitted.add(i)
        batcher.step(plan, lambda e: events[e.seq].append(e))
        step += 1
        assert step < 200
    return events


def body(rank, world_size, ckpts: dict):
    import torch.distributed as dist

    from mtnlg.distributed.topology import ParallelDims, Topology
    from mtnlg.inference import Groups, InferenceEngine
    from mtnlg.inference.batching import Batcher

    topo = Topology(ParallelDims(world_size=4, tp=2, pp=2))
    pair = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    layouts = {
        "tp1": Groups(),
        "tp2": Groups(tp_group=pair),
        "pp2": Groups(pp_group=pair),
        "tp2pp2": Groups.from_topology(topo),
    }
    reqs = _requests()
    out = {}
    for name, groups in layouts.items():
        eng = InferenceEngine.load(ckpts[name], groups)
        events = _drive(Batcher(eng, slots=3), reqs)
        out[name] = {
            i: [(e.token, e.logprob, e.finish, e.text) for e in ev] for i, ev in events.items()
        }
        out[name + "_prompt_lps"] = events[4][0].prompt_logprobs
        if name == "tp1":  # each request alone, through the static engine; its logits
            alone = [eng.generate([r], batch_size=1, return_logits=True)[0] for r in reqs]
            out["alone"] = [(a.tokens, a.text, a.finish_reason, a.logits) for a in alone]
            out["prompt_logits"] = eng.model.head_logits(_hidden(eng, reqs[4].prompt_tokens))
            aborted = _drive(Batcher(eng, slots=3), reqs, abort_at={0: 2, 1: 5})
            out["aborted"] = {i: [(e.token, e.finish) for e in ev] for i, ev in aborted.items()}
        dist.barrier()
    return out


def _hidden(eng, prompt):
    """The final-norm hidden states of a whole prompt (1, n, h), by the training forward."""
    m = eng.model
    ids = torch.tensor([prompt])
    x = m.embedding(ids, torch.arange(len(prompt))[None])
    for i in m.layer_ids:
        x = m.layers[str(i)](x)
    return m.final_norm(x)


@pytest.fixture(scope="module")
def runs(hf_model, tmp_path_factory):
    folder, _ = hf_model
    root = tmp_path_factory.mktemp("cb")
    ckpts = {}
    for name, (tp, pp) in LAYOUTS.items():
        ckpts[name] = str(root / name)
        hf_to_mtnlg(str(folder), ckpts[name], tp=tp, pp=pp)
    return run_distributed(
        body, world_size=4, args=(ckpts,), timeout=300, start_method="forkserver"
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_admitted_mid_batch_equals_alone(runs, hf_model, layout):
    """Every rank saw the same events; each request's tokens, text and finish equal its run
    alone; greedy ones equal transformers'."""
    _, model = hf_model
    reqs = _requests()
    for rank in range(4):
        got = runs[rank][layout]
        for i, (toks, text, finish, _) in enumerate(runs[0]["alone"]):
            ev = got[i]
            assert [t for t, *_ in ev] == toks, (layout, rank, i)
            assert ev[-1][2] == finish and ev[-1][3] == text, (layout, rank, i)
            assert all(e[2] is None for e in ev[:-1])
            if reqs[i].params.is_greedy:
                n = reqs[i].params.max_new_tokens
                assert toks == hf_greedy(model, list(reqs[i].prompt_tokens), n, EOD)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logprobs_equal_log_softmax_of_alone_logits(runs, layout):
    reqs = _requests()
    for i, r in enumerate(reqs):
        k = r.params.logprobs
        got = runs[0][layout][i]
        if k is None:
            assert all(lp is None for _, lp, *_ in got)
            continue
        logits = runs[0]["alone"][i][3]
        for (tok, lp, *_), row in zip(got, logits):
            ref = torch.log_softmax(row.double(), dim=-1)
            assert lp.token == tok
            assert lp.logprob == pytest.approx(float(ref[tok]), abs=1e-4)
            assert len(lp.top) == k
            best = ref.argsort(descending=True, stable=True)[:k].tolist()
            assert [t for t, _ in lp.top] == best
            for t, v in lp.top:
                assert v == pytest.approx(float(ref[t]), abs=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prompt_logprobs(runs, layout):
    prompt = _requests()[4].prompt_tokens
    lps = runs[0][layout + "_prompt_lps"]
    assert lps[0] is None and len(lps) == len(prompt)
    ref = torch.log_softmax(runs[0]["prompt_logits"][0, :, :5000].double(), dim=-1)
    for j, lp in enumerate(lps[1:]):
        assert lp.token == prompt[j + 1]
        assert lp.logprob == pytest.approx(float(ref[j, prompt[j + 1]]), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[j].argsort(descending=True, stable=True)[:2].tolist()


def test_abort_frees_the_slot_and_others_are_unchanged(runs):
    got, alone = runs[0]["aborted"], runs[0]["alone"]
    for i in (0, 1):
        assert got[i][-1] == (None, "abort")
        assert len(got[i]) - 1 < len(alone[i][0])
        assert [t for t, _ in got[i][:-1]] == alone[i][0][: len(got[i]) - 1]
    for i in set(range(8)) - {0, 1}:
        assert [t for t, _ in got[i]] == alone[i][0]
