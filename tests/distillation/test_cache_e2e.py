"""The teacher pass and the student from the cache, end to end (demo corpus, tiny vocabulary).

The teacher is a 2-layer Hugging Face GPT-2 folder (random, wide initialisation so its top-k
is well separated) read through the converter; the cache holds 32 samples in 4 chunks and the
teacher's log-sum-exp at T = 1 and 2 (``--kd-temperature 2 1``).

* each stored log-sum-exp is the teacher's log sum exp(z / T) over its vocabulary, computed
  directly from ``transformers``' logits for the same samples, and the ids its top-k;
* the cache written at TP2 x PP2 equals the one written at TP1 (ids equal, values 1e-5);
* a write stopped after one chunk per DP rank (2 processes through the real `deepspeed`
  launcher, `distill.py cache`) and resumed by one process is byte-identical to the
  uninterrupted TP1 write;
* a student at T = 2, TP2 x PP2 (pipeline engine, 4 micro-batches) from the cache equals a
  student at TP1 from it: losses and gradient norms of every iteration and the merged final
  weights (clipping off, Adam eps 1e-4, as ``tests/e2e/test_equivalence.py``);
* a cache for other data (another --seed) is refused, naming both values; a student at a
  temperature the cache lacks (`distill.py --kd-temperature 3`) exits non-zero before training,
  naming the flag, the cache and the temperatures it holds.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mtnlg.distillation.cache import CacheSpec, TeacherCache, chunk_path
from tests.e2e import conftest as e2e
from tests.e2e.conftest import ROOT, TINY_MERGES, TINY_VOCAB
from tests.e2e.pretrain_runs import Run as TrainRun
from tests.e2e.pretrain_runs import assert_equivalent, merged_weights, read_metrics
from tests.helpers.dist import deepspeed_cmd, run_distributed

_demo_data = e2e.demo_prefix  # the e2e session fixture, registered here

SEQ, K, SAMPLES, CHUNK = 16, 16, 32, 8
TEMPS = ["2", "1"]  # the teacher pass sorts them: header [1.0, 2.0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=5000, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3
    )
    out = tmp_path_factory.mktemp("teacher_hf")
    GPT2LMHeadModel(cfg).save_pretrained(out)
    return str(out)


def cache_args(prefix, teacher, out, tp=1, pp=1, extra=()):
    return [
        "--teacher", teacher, "--cache-dir", str(out), "--top-k", str(K),
        "--cache-dtype", "fp32", "--chunk-samples", str(CHUNK),
        "--data-path", prefix, "--split", "95,5,0", "--seed", "11", "--seq-length", str(SEQ),
        "--global-batch-size", "8", "--train-iters", str(SAMPLES // 8),
        "--vocab-file", str(TINY_VOCAB), "--merge-file", str(TINY_MERGES),
        "--micro-batch-size", "4", "--no-progress", "--kd-temperature", *TEMPS,
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        *extra,
    ]  # fmt: skip


def student_args(prefix, cache, out, tp=1, pp=1, seed=11, temperature="2.0"):
    return [
        "--teacher-cache", str(cache),
        "--student-num-layers", "2", "--student-hidden-size", "32",
        "--student-num-attention-heads", "4",
        "--kd-temperature", temperature, "--kd-alpha", "0.5",
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", str(SAMPLES // 8), "--lr", "2e-3", "--clip-grad", "0",
        "--adam-eps", "1e-4", "--seed", str(seed),
        "--data-path", prefix, "--split", "95,5,0",
        "--vocab-file", str(TINY_VOCAB), "--merge-file", str(TINY_MERGES),
        "--eval-interval", "0", "--log-interval", "1", "--no-progress",
        "--metrics-file", str(out / "metrics.jsonl"), "--save", str(out / "ckpt"),
    ]  # fmt: skip


def _write_cache(rank, world_size, argv):
    from mtnlg.distillation.cache_write import run

    return run(argv)


def _distill(rank, world_size, argv):
    from mtnlg.distillation.driver import run

    try:
        run(argv)
    except SystemExit as e:
        return str(e)
    return None


def _student(prefix, cache, out, tp, pp) -> TrainRun:
    out.mkdir(parents=True, exist_ok=True)
    errors = run_distributed(
        _distill,
        tp * pp,
        args=(student_args(prefix, cache, out, tp, pp),),
        timeout=300,
        start_method="forkserver",
    )
    assert errors == [None] * (tp * pp), errors
    losses, norms = read_metrics(out / "metrics.jsonl")
    return TrainRun(losses, norms, *merged_weights(out / "ckpt"))


@pytest.fixture(scope="module")
def tp1_cache(_demo_data, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache_tp1")
    (result,) = run_distributed(
        _write_cache,
        1,
        args=(cache_args(_demo_data, teacher, out),),
        timeout=300,
        start_method="forkserver",
    )
    assert result["chunks_written"] == SAMPLES // CHUNK
    return out


def _files(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.timeout(600)
def test_tp2_pp2_cache_equals_tp1(_demo_data, teacher, tp1_cache, tmp_path):
    run_distributed(
        _write_cache,
        4,
        args=(cache_args(_demo_data, teacher, tmp_path, 2, 2),),
        timeout=300,
        start_method="forkserver",
    )
    assert CacheSpec.read(tmp_path) == CacheSpec.read(tp1_cache)
    got, want = TeacherCache(tmp_path), TeacherCache(tp1_cache)
    ids, values, lse = got.get(range(SAMPLES))
    ids1, values1, lse1 = want.get(range(SAMPLES))
    assert torch.equal(ids, ids1)
    torch.testing.assert_close(values, values1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse1, rtol=1e-5, atol=1e-5)
    assert values.std() > 0.5  # a teacher with a real spread, not near-ties
    assert (ids < 5000).all() and (ids.diff(dim=-1) > 0).all()  # real ids, sorted, distinct


@pytest.mark.timeout(600)
def test_killed_write_resumes_byte_identical(_demo_data, teacher, tp1_cache, tmp_path):
    """Two DP writers through `deepspeed`: each stops after one chunk; one process finishes."""
    out, hostfile = tmp_path / "cache", tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    argv = ["cache", *cache_args(_demo_data, teacher, out, extra=["--exit-after-chunks", "1"])]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = deepspeed_cmd(ROOT / "mtnlg" / "distill.py", argv, hostfile)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    spec = CacheSpec.read(out)
    done = [c for c in range(spec.num_chunks) if chunk_path(out, c).is_file()]
    assert done == [0, 1]  # DP rank 0 wrote chunk 0, DP rank 1 chunk 1
    assert not list(out.glob("*.tmp*"))
    with pytest.raises(ValueError, match="truncated: 2 of 4 chunks"):
        TeacherCache(out)
    (result,) = run_distributed(
        _write_cache,
        1,
        args=(cache_args(_demo_data, teacher, out),),
        timeout=300,
        start_method="forkserver",
    )
    assert result["chunks_written"] == 2
    assert _files(out) == _files(tp1_cache)
    # the tokenizer shipped with the cache too
    assert _files(out / "tokenizer") == _files(tp1_cache / "tokenizer")


@pytest.mark.timeout(900)
def test_tp2_pp2_student_equals_tp1_student(_demo_data, tp1_cache, tmp_path):
    one = _student(_demo_data, tp1_cache, tmp_path / "tp1", 1, 1)
    four = _student(_demo_data, tp1_cache, tmp_path / "tp2pp2", 2, 2)
    assert four.layout == (2, 2, 1)
    assert all(torch.isfinite(torch.tensor(one.losses)))
    assert_equivalent(four, one, loss_rtol=1e-6, norm_rtol=1e-6, weight_atol=1e-5)


@pytest.mark.timeout(300)
def test_cache_for_other_data_is_refused(_demo_data, tp1_cache, tmp_path):
    argv = student_args(_demo_data, tp1_cache, tmp_path, seed=12)
    (err,) = run_distributed(_distill, 1, args=(argv,), timeout=120, start_method="forkserver")
    assert err is not None and "dataset seed 11 in the cache vs 12 for the student" in err


@pytest.mark.timeout(300)
def test_cache_holds_the_teachers_lse_at_each_temperature(_demo_data, teacher, tp1_cache):
    from transformers import GPT2LMHeadModel

    from mtnlg.distillation.cache_write import build_parser
    from mtnlg.training.data import build_datasets

    assert CacheSpec.read(tp1_cache).temperatures == (1.0, 2.0)
    args = build_parser().parse_args(cache_args(_demo_data, teacher, tp1_cache))
    train = build_datasets(args, SEQ, (SAMPLES, 0, 0), args.seed)[0]
    tokens = torch.stack([torch.as_tensor(train[i]["text"][:-1]) for i in range(SAMPLES)])
    model = GPT2LMHeadModel.from_pretrained(teacher).eval()
    with torch.no_grad():
        logits = model(tokens.long()).logits  # (n, s, 5000): the samples the cache is for
    for t in (1.0, 2.0):
        ids, values, lse = TeacherCache(tp1_cache, temperature=t).get(range(SAMPLES))
        torch.testing.assert_close(lse, (logits / t).logsumexp(dim=-1), rtol=1e-5, atol=1e-4)
    assert torch.equal(ids, logits.topk(K, dim=-1).indices.sort(dim=-1).values)
    torch.testing.assert_close(values, logits.gather(-1, ids), rtol=1e-5, atol=1e-4)


@pytest.mark.timeout(300)
def test_student_at_a_temperature_the_cache_lacks_is_refused(_demo_data, tp1_cache, tmp_path):
    argv = student_args(_demo_data, tp1_cache, tmp_path, temperature="3")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "mtnlg" / "distill.py"), *argv]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    want = (
        f"error: --kd-temperature 3: the teacher cache {tp1_cache} holds the teacher's "
        "log-sum-exp at T = 1, 2 only"
    )
    assert want in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "metrics.jsonl").exists()
