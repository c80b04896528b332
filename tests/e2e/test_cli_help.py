"""Every command-line entry point answers ``--help``: exit 0, a usage line, its own flags.

Each runs as a real subprocess (the way users start it), from outside the repository for the
script files, so a broken import path or parser shows up here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT

CONVERT = str(ROOT / "checkpoint_tools" / "convert_checkpoint.py")
# (command after `python`, text its help must show)
ENTRY_POINTS = [
    ([str(ROOT / "mtnlg" / "pretrain.py")], "--tensor-model-parallel-size"),
    ([str(ROOT / "mtnlg" / "evaluate.py")], "--text-file"),
    ([str(ROOT / "mtnlg" / "distill.py")], "--teacher"),
    ([str(ROOT / "mtnlg" / "distill.py")], "--student-load"),
    ([str(ROOT / "mtnlg" / "prune.py")], "--target-params"),
    ([str(ROOT / "mtnlg" / "generate.py")], "--prompts-file"),
    (["-m", "mtnlg.inference.server"], "--port"),
    ([str(ROOT / "mtnlg" / "inference" / "server.py")], "--host"),
    (["-m", "mtnlg.plan"], "--train-tokens"),
    ([CONVERT], "mtnlg-to-hf,hf-to-mtnlg,reshard"),
    ([CONVERT, "mtnlg-to-hf"], "--dtype"),
    ([CONVERT, "hf-to-mtnlg"], "--make-vocab-size-divisible-by"),
    ([CONVERT, "reshard"], "--weights-only"),
    (["-m", "mtnlg.data.preprocess"], "--output-prefix"),
    (["-m", "mtnlg.data.merge"], "--output-prefix"),
    (["-m", "mtnlg.data.train_tokenizer"], "--vocab-size"),
    (["-m", "mtnlg.plot"], "--output"),
]


@pytest.mark.parametrize(
    "cmd,expected", ENTRY_POINTS, ids=[" ".join(c[-2:]).split("/")[-1] for c, _ in ENTRY_POINTS]
)
def test_help(cmd, expected, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("PYTHONPATH", None)
    if cmd[0] == "-m":  # a module needs the package on the path; a script finds it itself
        env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, *cmd, "--help"],
        cwd=tmp_path,  # not the repository: the entry points must find the package themselves
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]
    assert expected in proc.stdout
    assert "Traceback" not in proc.stderr
