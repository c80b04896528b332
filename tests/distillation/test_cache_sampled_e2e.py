"""A sampled teacher cache (``distill.py cache --top-k 4 --sampled-k 8``) end to end.

The teacher is test_cache_e2e's 2-layer Hugging Face GPT-2 folder; the cache, written once at
TP = 2 (each rank draws from its vocabulary shard), holds 32 samples in 4 chunks at T = 1.

* the header is version 3 (top_k 4, sampled_k 8, sample_temperature 1); per token the first 4
  entries are the teacher's top-4 (ids and logits of ``transformers``' logits for the same
  samples), the next 8 ids outside it, real and sorted, with the teacher's logits at them, and
  the log-sum-exp is ``transformers``' at T = 1;
* a write stopped after one chunk and resumed is byte-identical to the uninterrupted one (the
  draws are seeded per sample, not by the run);
* a student at TP2 x PP2 (pipeline engine) from the cache equals a student at TP1 from it
  (both read the same samples): losses and gradient norms of every iteration 1e-6 relative,
  merged final weights 1e-5, as the top-k cache's test demands;
* refusals, before training and naming the flag: ``--kd-loss reverse-kl`` (exit code non-zero,
  through ``distill.py``), ``--cache-kd-loss topk-renorm``, ``--kd-temperature 2`` (naming the
  cache and the temperature it was sampled at), and for the cache pass ``--sampled-k`` with
  two temperatures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mtnlg.distillation.cache import TeacherCache
from mtnlg.training import checkpointing
from tests.distillation import test_cache_e2e as base
from tests.distillation.test_cache_e2e import (
    SAMPLES,
    SEQ,
    _distill,
    _files,
    _write_cache,
    cache_args,
    student_args,
)
from tests.e2e import conftest as e2e
from tests.e2e.conftest import ROOT
from tests.e2e.pretrain_runs import Run as TrainRun
from tests.e2e.pretrain_runs import assert_equivalent, merged_weights, read_metrics
from tests.helpers.dist import run_distributed

_demo_data = e2e.demo_prefix  # the e2e session fixture, registered here
gpt2_teacher = base.teacher  # test_cache_e2e's teacher fixture, registered here

K1, K2 = 4, 8
SAMPLED = ["--top-k", str(K1), "--sampled-k", str(K2), "--kd-temperature", "1"]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _cache_argv(prefix, gpt2_teacher, out, extra=()):
    return cache_args(prefix, gpt2_teacher, out, tp=2, extra=[*SAMPLED, *extra])


def _write(prefix, gpt2_teacher, out, extra=()) -> dict:
    results = run_distributed(
        _write_cache,
        2,
        args=(_cache_argv(prefix, gpt2_teacher, out, extra),),
        timeout=300,
        start_method="forkserver",
    )
    return results[0]


@pytest.fixture(scope="module")
def sampled_cache(_demo_data, gpt2_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache_sampled_tp2")
    assert _write(_demo_data, gpt2_teacher, out)["chunks_written"] == 4
    return out


def _student_argv(prefix, cache, out, tp=1, pp=1, extra=()):
    argv = student_args(prefix, cache, out, tp, pp, temperature="1.0")
    return [*argv, "--kd-alpha", "1", *extra]


def _student(prefix, cache, out, tp, pp) -> TrainRun:
    out.mkdir(parents=True, exist_ok=True)
    argv = _student_argv(prefix, cache, out, tp, pp)
    errors = run_distributed(
        _distill, tp * pp, args=(argv,), timeout=300, start_method="forkserver"
    )
    assert errors == [None] * (tp * pp), errors
    losses, norms = read_metrics(out / "metrics.jsonl")
    return TrainRun(losses, norms, *merged_weights(out / "ckpt"))


@pytest.mark.timeout(300)
def test_sampled_cache_holds_the_teachers_head_and_tail(_demo_data, gpt2_teacher, sampled_cache):
    from transformers import GPT2LMHeadModel

    from mtnlg.distillation.cache_write import build_parser
    from mtnlg.training.data import build_datasets

    header = json.loads((sampled_cache / "header.json").read_text())
    assert header["version"] == 3 and header["temperatures"] == [1.0]
    assert (header["top_k"], header["sampled_k"], header["sample_temperature"]) == (K1, K2, 1.0)
    args = build_parser().parse_args(_cache_argv(_demo_data, gpt2_teacher, sampled_cache))
    train = build_datasets(args, SEQ, (SAMPLES, 0, 0), args.seed)[0]
    tokens = torch.stack([torch.as_tensor(train[i]["text"][:-1]) for i in range(SAMPLES)])
    with torch.no_grad():
        logits = GPT2LMHeadModel.from_pretrained(gpt2_teacher).eval()(tokens.long()).logits
    ids, values, lse = TeacherCache(sampled_cache).get(range(SAMPLES))
    assert ids.shape == (SAMPLES, SEQ, K1 + K2)
    head, tail = ids[..., :K1], ids[..., K1:]
    assert torch.equal(head, logits.topk(K1, dim=-1).indices.sort(dim=-1).values)
    torch.testing.assert_close(values, logits.gather(-1, ids), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lse, logits.logsumexp(dim=-1), rtol=1e-5, atol=1e-4)
    assert (tail < 5000).all() and (tail.diff(dim=-1) >= 0).all()
    assert not (tail.unsqueeze(-1) == head.unsqueeze(-2)).any(), "a head id was sampled"
    assert (tail.diff(dim=-1) == 0).any(), "draws with replacement repeat ids"
    assert len(tail.unique()) > 500  # a spread over the tail, from both TP shards
    assert (tail >= 2500).any() and (tail < 2500).any()


@pytest.mark.timeout(600)
def test_killed_sampled_write_resumes_byte_identical(
    _demo_data, gpt2_teacher, sampled_cache, tmp_path
):
    out = tmp_path / "cache"
    assert (
        _write(_demo_data, gpt2_teacher, out, ["--exit-after-chunks", "1"])["chunks_written"] == 1
    )
    assert _write(_demo_data, gpt2_teacher, out)["chunks_written"] == 3
    assert _files(out) == _files(sampled_cache)


@pytest.mark.timeout(900)
def test_tp2_pp2_student_equals_tp1_student_from_sampled_cache(_demo_data, sampled_cache, tmp_path):
    one = _student(_demo_data, sampled_cache, tmp_path / "tp1", 1, 1)
    four = _student(_demo_data, sampled_cache, tmp_path / "tp2pp2", 2, 2)
    assert four.layout == (2, 2, 1)
    assert all(torch.isfinite(torch.tensor(one.losses)))
    meta = checkpointing.read_meta(tmp_path / "tp1" / "ckpt")["distill"]
    assert (meta["cache_kd_loss"], meta["top_k"], meta["sampled_k"]) == ("topk-sampled", K1, K2)
    assert_equivalent(four, one, loss_rtol=1e-6, norm_rtol=1e-6, weight_atol=1e-5)


@pytest.mark.timeout(400)
def test_sampled_cache_refusals(_demo_data, gpt2_teacher, sampled_cache, tmp_path):
    argv = _student_argv(_demo_data, sampled_cache, tmp_path, extra=["--kd-loss", "reverse-kl"])
    cmd = [sys.executable, str(ROOT / "mtnlg" / "distill.py"), *argv]
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "error: --kd-loss reverse-kl: a teacher cache with sampled ids (--sampled-k 8)" in (
        proc.stderr
    ), proc.stderr[-2000:]
    for extra, want in [
        (["--cache-kd-loss", "topk-renorm"], "error: --cache-kd-loss topk-renorm: the teacher"),
        (
            ["--kd-temperature", "2"],
            f"error: --kd-temperature 2: the teacher cache {sampled_cache} sampled the teacher's "
            "tail at T = 1 (--sampled-k 8)",
        ),
    ]:
        argv = _student_argv(_demo_data, sampled_cache, tmp_path, extra=extra)
        (err,) = run_distributed(_distill, 1, args=(argv,), timeout=120, start_method="forkserver")
        assert err is not None and want in err, err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "metrics.jsonl").exists()
    argv = [
        "cache",
        *_cache_argv(_demo_data, gpt2_teacher, tmp_path / "c", ["--kd-temperature", "1", "2"]),
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "mtnlg" / "distill.py"), *argv],
        env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "error: --sampled-k 8: the tail is sampled at one temperature" in proc.stderr
    assert not (tmp_path / "c").exists()
