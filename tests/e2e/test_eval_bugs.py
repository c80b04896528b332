"""Regressions: MFU reaches the logs; pipeline evaluation is exact (partial windows, DP, ramp-up).

The processes are shared: one spawn of 1, 2 and 4 ranks each runs several drivers in turn
(pretrain / distill / evaluate, in-process), and each test checks its part of the results.
References are independent: transformers' GPT2LMHeadModel for perplexity, the PP=1 run for the
pipeline's validation loss.
"""

from __future__ import annotations

import json

import pytest

from tests.checkpoint.conftest import TEXT, make_hf_gpt2
from tests.checkpoint.test_ckpt_e2e import hf_text_loss
from tests.e2e.conftest import TINY_MERGES, TINY_VOCAB
from tests.e2e.test_pretrain import base_args
from tests.helpers.dist import run_distributed

PEAK = 0.5  # TFLOP/s, any positive number
SEQ = 32
RAMP = ["--rampup-batch-size", "4", "2", "24", "--eval-interval", "1", "--eval-iters", "1"]


def _jobs(rank, world_size, jobs):
    """Run pretrain / distill / evaluate drivers one after another in this process group."""
    from mtnlg.distillation import driver
    from mtnlg.evaluation import run as ev
    from mtnlg.training import checkpointing, pretrain
    from mtnlg.training.arguments import build_parser

    out = []
    for kind, argv in jobs:
        if kind == "eval":
            args = ev.build_parser("eval").parse_args(argv)
            out.append(ev._run(args, checkpointing.read_meta(args.load)))
        elif kind == "distill":
            driver._run(driver.build_distill_parser("distill").parse_args(argv))
            out.append(None)
        else:
            pretrain._run(build_parser("train").parse_args(argv))
            out.append(None)
    return out


def _rows(path, kind):
    return [r for r in map(json.loads, open(path)) if r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(demo_prefix, tmp_path_factory):
    """All the runs, by name: evaluation results, and metrics files of the training runs."""
    from mtnlg.checkpoint.convert import hf_to_mtnlg

    d = tmp_path_factory.mktemp("evalbugs")
    hf = d / "hf"
    make_hf_gpt2(hf)
    for tp, pp in [(1, 1), (1, 2)]:
        hf_to_mtnlg(str(hf), str(d / f"c{tp}{pp}"), tp, pp, make_vocab_size_divisible_by=8)
    text = d / "text.txt"
    text.write_text(TEXT[:600])  # 221 tokens: 6 windows of 33 and a partial one of 23

    def ev(ckpt, mb=1):
        argv = ["--load", str(d / ckpt), "--text-file", str(text), "--micro-batch-size", str(mb)]
        return ("eval", argv)

    def metrics(name):
        return ["--log-interval", "1", "--metrics-file", str(d / f"{name}.jsonl")]

    mfu = ["--peak-tflops", str(PEAK)]
    distill = [
        "--teacher", str(hf), "--student-num-layers", "1", "--seq-length", str(SEQ),
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
        "--data-path", demo_prefix, "--split", "95,5,0", "--vocab-file", str(TINY_VOCAB),
        "--merge-file", str(TINY_MERGES), "--eval-interval", "1000", "--no-progress",
        *mfu, *metrics("distill"),
    ]  # fmt: skip
    one = [
        ("train", base_args(demo_prefix, iters=2, extra=mfu + metrics("pretrain"))),
        ("distill", distill),
        ("train", base_args(demo_prefix, iters=3, extra=RAMP + metrics("ramp1"))),
        ev("c11"),
    ]
    two = [
        ("train", base_args(demo_prefix, pp=2, iters=3, extra=RAMP + metrics("ramp2"))),
        ev("c12", 3),
    ]
    four = [ev("c12", 2), ev("c11")]  # PP2 x DP2 and DP4: some ranks get padding windows
    out = {"dir": d}
    _, _, _, out["eval_tp1"] = run_distributed(
        _jobs, 1, args=(one,), timeout=400, start_method="forkserver"
    )[0]
    res2 = run_distributed(_jobs, 2, args=(two,), timeout=400, start_method="forkserver")
    out["eval_pp2"] = [r[1] for r in res2]
    res4 = run_distributed(_jobs, 4, args=(four,), timeout=400, start_method="forkserver")
    out["eval_pp2_dp2"] = [r[0] for r in res4]
    out["eval_dp4"] = [r[1] for r in res4]

    # the reference: transformers on the same windows, and the number of targets
    from mtnlg.data.tokenizer import load_tokenizer

    ids = load_tokenizer(d / "c11" / "iter_0000000" / "tokenizer").tokenize(text.read_text())
    assert len(ids) % (SEQ + 1) > 1  # the last window is partial
    out["hf_loss"] = hf_text_loss(hf, ids, SEQ)
    out["targets"] = len(ids) - -(-len(ids) // (SEQ + 1))  # one less per window
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["pretrain", "distill"])
def test_peak_tflops_logs_mfu(runs, name):
    rows = _rows(runs["dir"] / f"{name}.jsonl", "train")
    assert len(rows) == 2
    for r in rows:
        assert r["tflops_per_gpu"] > 0
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / PEAK, rel=1e-12)


@pytest.mark.timeout(900)
def test_pipeline_eval_during_rampup_matches_pp1(runs):
    """Eval at iterations 1-3, global batch 4 of the final 8: all 4 eval micro-batches count."""
    pp1 = _rows(runs["dir"] / "ramp1.jsonl", "eval")
    pp2 = _rows(runs["dir"] / "ramp2.jsonl", "eval")
    assert [r["iteration"] for r in pp1] == [1, 2, 3] == [r["iteration"] for r in pp2]
    assert [r["val_loss"] for r in pp2] == pytest.approx([r["val_loss"] for r in pp1], rel=1e-5)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ["eval_pp2", "eval_pp2_dp2", "eval_dp4"])
def test_perplexity_exact_with_partial_windows(runs, layout):
    """PP2 (micro-batch 3), PP2 x DP2 (2), DP4 (1) == TP1 == transformers, last window partial."""
    results = runs[layout]
    assert all(r == results[0] for r in results), "ranks disagree"
    assert runs["eval_tp1"]["tokens"] == results[0]["tokens"] == runs["targets"]
    assert runs["eval_tp1"]["loss"] == pytest.approx(runs["hf_loss"], rel=1e-5)
    assert results[0]["loss"] == pytest.approx(runs["hf_loss"], rel=1e-5)
    assert results[0]["perplexity"] == pytest.approx(runs["eval_tp1"]["perplexity"], rel=1e-5)
