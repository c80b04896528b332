"""Bad input to prune.py: a clear error naming the flag or file, a non-zero exit, nothing
written (neither --save nor --scores-out)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.compression.conftest import calib_argv
from tests.compression.test_prune_importance import calibrate
from tests.e2e.conftest import ROOT
from tests.helpers.dist import run_distributed


@pytest.fixture(scope="module")
def gpt2_scores(gpt2, tmp_path_factory):
    path = tmp_path_factory.mktemp("s") / "gpt2.safetensors"
    calibrate(gpt2, "tp1", path, 1)
    return path


def _refused(argv, match, tmp_path):
    from mtnlg.compression.run import run

    with pytest.raises(SystemExit, match=match):
        run(argv)
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--target-hidden-size", "128"], "--target-hidden-size 128: must be between 1 and the model's 64"),
        (["--target-num-layers", "9"], "--target-num-layers 9: must be between 1"),
        (["--target-params", "1e9"], r"--target-params 1000000000: must be in \(0, "),
        (["--target-num-attention-heads", "3", "--tp", "2"], "--target-num-attention-heads 3 is not divisible by the TP size --tp 2"),
        (["--target-ffn-hidden-size", "101", "--tp", "2"], "--target-ffn-hidden-size 101 is not divisible"),
        (["--drop-layers", "1,7"], r"--drop-layers \[1, 7\]"),
        (["--drop-layers", "0,1,2", "--pp", "2"], "1 blocks left cannot fill --pp 2"),
        (["--target-params", "1e5", "--target-num-layers", "2"], "--target-params picks the whole shape"),
        ([], "give a target"),
    ],
)  # fmt: skip
def test_bad_targets_refused_before_calibration(gpt2, tmp_path, extra, match):
    argv = calib_argv(gpt2, "tp1", tmp_path / "s.safetensors", "--save", str(tmp_path / "out"))
    _refused([*argv, *extra], match, tmp_path)


def test_gqa_target_must_keep_groups_whole(llama, tmp_path):
    argv = calib_argv(llama, "tp1", tmp_path / "s.safetensors", "--save", str(tmp_path / "out"))
    _refused([*argv, "--target-num-attention-heads", "3"], "multiple of the 2 groups", tmp_path)


def test_bad_flags_and_files(gpt2, gpt2_scores, tmp_path):
    base = ["--load", str(gpt2["tp1"])]
    out = ["--save", str(tmp_path / "out"), "--target-num-layers", "2"]
    _refused([*base, "--scores-out", str(tmp_path / "s.safetensors"), *out, "--calib-data",
              str(tmp_path / "none.txt")], "--calib-data .*none.txt: no such file", tmp_path)  # fmt: skip
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    _refused([*base, "--calib-data", str(bad), *out], r"bad\.jsonl:2: key .text. is int, not a string",
             tmp_path)  # fmt: skip
    _refused([*base, *out], "give --calib-data .* or --scores FILE", tmp_path)
    _refused([*base, "--scores", str(gpt2_scores)], "nothing to write", tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    _refused([*base, "--scores", str(junk), *out], "not a readable safetensors file", tmp_path)
    (tmp_path / "exists").mkdir()
    _refused([*base, "--scores", str(gpt2_scores), "--save", str(tmp_path / "exists"),
              "--target-num-layers", "2"], "already exists; refusing", tmp_path)  # fmt: skip


def test_scores_of_another_model_refused(gpt2, llama, gpt2_scores, tmp_path):
    """Another shape: refused before anything runs, naming the field. The same shape with other
    weights: the fingerprint check stops the prune, nothing written."""
    from mtnlg.checkpoint.convert import hf_to_mtnlg
    from tests.checkpoint.conftest import make_hf_gpt2

    out = ["--save", str(tmp_path / "out"), "--target-num-layers", "2"]
    _refused(["--load", str(llama["tp1"]), "--scores", str(gpt2_scores), *out],
             "computed on another model .*: its hidden_size is 64, this checkpoint's is 32",
             tmp_path)  # fmt: skip
    other = tmp_path / "other"
    make_hf_gpt2(other / "hf", n_layer=4, seed=7)
    hf_to_mtnlg(str(other / "hf"), str(other / "ck"), 1, 1, make_vocab_size_divisible_by=8)
    argv = ["--load", str(other / "ck"), "--scores", str(gpt2_scores), *out]
    with pytest.raises(RuntimeError, match="computed on other weights: embedding.word_embeddings"):
        run_distributed(_prune_py, 1, args=(argv,), timeout=120, start_method="forkserver")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out.tmp")]


def _prune_py(rank, world, argv):
    from mtnlg.compression.run import run

    run(argv)


def test_cli_exit_status(gpt2, tmp_path):
    """The real entry script: non-zero exit and the message on stderr; --help works."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    script = str(ROOT / "mtnlg" / "prune.py")
    argv = calib_argv(gpt2, "tp1", tmp_path / "s.safetensors", "--save", str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, script, *argv, "--target-hidden-size", "999"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "--target-hidden-size 999" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = subprocess.run([sys.executable, script, "--help"], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "--target-params" in proc.stdout
