"""generate.py: a real launcher run writing the JSONL (checked against transformers), --help,
and the refusals of bad input (before any process starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mtnlg.checkpoint.convert import hf_to_mtnlg
from mtnlg.data.tokenizer import GPT2BPETokenizer
from mtnlg.inference.cli import run
from tests.helpers.dist import deepspeed_cmd
from tests.inference.gen_helpers import ROOT, hf_greedy

GENERATE = str(ROOT / "mtnlg" / "generate.py")
TEXTS = ["To be, or not to be", "Hello", "The king is dead; long live the"]


def _env():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return env


def test_generate_py_pp2_through_deepspeed_launcher(hf_model, tmp_path):
    folder, model = hf_model
    ckpt = tmp_path / "ckpt"
    hf_to_mtnlg(str(folder), str(ckpt), tp=1, pp=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out" / "gen.jsonl"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cmd = deepspeed_cmd(
        GENERATE,
        [
            "--load",
            str(ckpt),
            "--prompts-file",
            str(prompts),
            "--greedy",
            "--max-new-tokens",
            "8",
            "--batch-size",
            "2",
            "--output-jsonl",
            str(out),
        ],
        hostfile,
    )
    proc = subprocess.run(
        cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == TEXTS  # input order
    tok = GPT2BPETokenizer(folder / "vocab.json", folder / "merges.txt")
    for row in rows:
        assert row["tokens"] == hf_greedy(model, tok.tokenize(row["prompt"]), 8)
        assert row["text"] == tok.detokenize(row["tokens"])
        assert row["finish_reason"] == "length"


def test_help():
    proc = subprocess.run(
        [sys.executable, GENERATE, "--help"],
        env=_env(),
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")
    for flag in ("--prompts-file", "--max-new-tokens", "--top-p", "--output-jsonl"):
        assert flag in proc.stdout


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"prompt": "a"}', "{not json"], ":2: not JSON"),
        (['{"prompt": "a"}', "", '{"text": "b"}'], ':3: expected an object {"prompt": "..."}'),
        (['{"prompt": ""}'], ":1: empty prompt"),
        (['{"prompt": "a"}', json.dumps({"prompt": "a b " * 40})], ":2: prompt of"),
        ([], "no prompt in it"),
    ],
)
def test_bad_prompts_file_names_file_and_line(hf_model, tmp_path, lines, message):
    folder, _ = hf_model
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as e:
        run(["--load", str(folder), "--prompts-file", str(f), "--max-new-tokens", "8"])
    assert str(f) in str(e.value) and message in str(e.value)


def test_bad_flags(hf_model, tmp_path):
    folder, _ = hf_model
    with pytest.raises(SystemExit, match="--top-p"):
        run(["--load", str(folder), "--prompt", "a", "--top-p", "1.5"])
    with pytest.raises(SystemExit, match="no such file"):
        run(["--load", str(folder), "--prompts-file", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit, match="--load"):
        run(["--load", str(tmp_path / "nothing"), "--prompt", "a"])
