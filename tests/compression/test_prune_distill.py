"""``distill.py --student-load PRUNED``: the student starts from the pruned weights whatever the
layouts (pruned at TP1, student at TP2 online or TP1 x PP2 from a teacher cache): after one step
at lr 1e-12 the saved student equals the pruned checkpoint (to 1e-9). Through the real
``deepspeed`` launcher, prune.py calibrates at DP2 and prunes."""

from __future__ import annotations

import os
import subprocess
from unittest import mock

import pytest
import torch

from tests.compression.test_prune_export import merged, prune
from tests.compression.test_prune_importance import calibrate
from tests.e2e.conftest import ROOT, TINY_MERGES, TINY_VOCAB
from tests.helpers.dist import deepspeed_cmd, run_distributed


@pytest.fixture(scope="module")
def pruned(gpt2, tmp_path_factory):
    d = tmp_path_factory.mktemp("pruned")
    s = calibrate(gpt2, "tp1", d / "s.safetensors", 1)
    prune(gpt2, s, d / "p", 1, 1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=128,
          num_layers=3)  # fmt: skip
    return d / "p"


def _distill(rank, world, argv):
    from mtnlg.distillation.driver import run

    run(argv)


def _cache(rank, world, argv):
    from mtnlg.distillation.cache_write import run

    run(argv)


def student_args(prefix, extra=()):
    return [
        "--kd-temperature", "1", "--kd-alpha", "1", "--seq-length", "16",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-12", "--min-lr", "1e-12",
        "--data-path", prefix, "--split", "95,5,0", "--eval-interval", "1000",
        "--vocab-file", str(TINY_VOCAB), "--merge-file", str(TINY_MERGES), "--no-progress",
        *extra,
    ]  # fmt: skip


def _same(a, b):
    a, b = merged(a), merged(b)
    assert list(a) == list(b)
    for k in a:
        # one Adam step at lr 1e-12 moves a weight by about 1e-12
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=1e-9, msg=k)


@pytest.mark.timeout(900)
def test_student_load_online_and_cache(gpt2, pruned, demo_prefix, tmp_path):
    argv = student_args(demo_prefix, ["--teacher", str(gpt2["tp2pp2"]), "--student-load",
                        str(pruned), "--tensor-model-parallel-size", "2",
                        "--save", str(tmp_path / "online")])  # fmt: skip
    run_distributed(_distill, 2, args=(argv,), timeout=300, start_method="forkserver")
    _same(tmp_path / "online", pruned)
    cache = tmp_path / "cache"
    argv = ["--teacher", str(gpt2["tp2pp2"]), "--cache-dir", str(cache), "--top-k", "4",
            "--sampled-k", "4", "--kd-temperature", "1", "--seq-length", "16",
            "--global-batch-size", "4", "--micro-batch-size", "2", "--train-iters", "1",
            "--data-path", demo_prefix, "--split", "95,5,0", "--vocab-file", str(TINY_VOCAB),
            "--merge-file", str(TINY_MERGES), "--no-progress"]  # fmt: skip
    run_distributed(_cache, 4, args=(argv,), timeout=300, start_method="forkserver")
    argv = student_args(demo_prefix, ["--teacher-cache", str(cache), "--student-load",
                        str(pruned), "--pipeline-model-parallel-size", "2",
                        "--save", str(tmp_path / "cached")])  # fmt: skip
    run_distributed(_distill, 2, args=(argv,), timeout=300, start_method="forkserver")
    _same(tmp_path / "cached", pruned)


def test_student_load_refuses_shape_flags(gpt2, pruned, demo_prefix):
    from mtnlg.distillation.driver import run

    argv = student_args(demo_prefix, ["--teacher", str(gpt2["tp1"]), "--student-load",
                        str(pruned), "--student-num-layers", "2"])  # fmt: skip
    # in this process: the refusal comes after the (one-process) process group is set up,
    # which writes RANK / MASTER_PORT ...: restored afterwards for the tests that follow
    with (
        mock.patch.dict(os.environ),
        pytest.raises(SystemExit, match="--student-load brings .* drop --student-num-layers"),
    ):
        run(argv)


@pytest.mark.timeout(600)
def test_prune_py_through_deepspeed_launcher(gpt2, tmp_path):
    """The real launcher, 2 processes (TP1 x DP2): the same scores as one process, and the
    pruned checkpoint written once (rank 0)."""
    from mtnlg.compression.scores import load_scores
    from tests.compression.conftest import calib_argv

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    argv = calib_argv(gpt2, "tp1", tmp_path / "ds.safetensors", "--save", str(tmp_path / "out"),
                      "--target-ffn-hidden-size", "128", "--tp", "2", "--output-json",
                      str(tmp_path / "summary.json"))  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    cmd = deepspeed_cmd(ROOT / "mtnlg" / "prune.py", argv, hostfile)
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one = calibrate(gpt2, "tp1", tmp_path / "one.safetensors", 1)
    two, meta = load_scores(tmp_path / "ds.safetensors")
    assert meta["calibration"]["layout"] == {"tp": 1, "pp": 1, "dp": 2}
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-8, msg=k)
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["target"]["ffn_hidden_size"] == [256, 128]
    assert merged(tmp_path / "out")["layers.0.mlp.up.weight"].shape == (128, 64)
