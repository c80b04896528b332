"""pretrain.py's --eval-tasks flags: refused with a clear message before any heavy work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mtnlg.data.tokenizer import GPT2BPETokenizer
from mtnlg.evaluation.tasks import prepare_eval_tasks
from mtnlg.pretrain import build_parser
from tests.e2e.conftest import TINY_MERGES, TINY_VOCAB, demo_prefix  # noqa: F401
from tests.inference.gen_helpers import ROOT

LAMBADA = str(ROOT / "data" / "lambada" / "lambada_test.jsonl")
WIKI = str(ROOT / "data" / "wikitext" / "wiki.test.tokens")


@pytest.fixture(scope="module")
def tok():
    return GPT2BPETokenizer(TINY_VOCAB, TINY_MERGES)


def _prepare(tok, *flags):
    return prepare_eval_tasks(build_parser().parse_args(list(flags)), tok, 32)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--eval-tasks", "lambada,hellaswag"], "unknown task 'hellaswag'"),
        (["--eval-tasks", "lambada,lambada", "--lambada-data", LAMBADA], "named twice"),
        (["--eval-tasks", "lambada"], "task lambada needs --lambada-data"),
        (["--eval-tasks", "wikitext", "--wikitext-file", "nope.tokens"], "--wikitext-file nope"),
        (["--eval-tasks", "wikitext", "--wikitext-file", WIKI, "--overlapping-eval", "33"],
         "--overlapping-eval 33"),
        (["--eval-tasks", "lambada", "--lambada-data", LAMBADA, "--eval-task-samples", "0"],
         "--eval-task-samples 0"),
        (["--eval-tasks", "lambada", "--lambada-data", WIKI], "wiki.test.tokens:2: not JSON"),  # line 1 is blank
    ],
)  # fmt: skip
def test_bad_flags_refused(tok, flags, message):
    with pytest.raises(ValueError, match=message):
        _prepare(tok, *flags)


def test_tasks_prepared_with_cap(tok, tmp_path):
    wiki = tmp_path / "wiki.tokens"
    wiki.write_text("".join(open(WIKI, encoding="utf-8").readlines()[:20]), encoding="utf-8")
    flags = ["--eval-tasks", "wikitext,lambada", "--lambada-data", LAMBADA]
    flags += ["--wikitext-file", str(wiki), "--eval-task-samples", "7", "--overlapping-eval", "8"]
    wiki, lam = _prepare(tok, *flags)
    assert (wiki.name, lam.name) == ("wikitext", "lambada")
    assert len(wiki.windows) == 7 and wiki.targets == 32 + 6 * 8
    assert len(lam.examples) == 7 and not lam.strict
    assert _prepare(tok) == []


def test_pretrain_exits_cleanly_on_bad_task_file(demo_prefix):  # noqa: F811
    from tests.e2e.test_pretrain import base_args

    argv = base_args(demo_prefix, extra=["--eval-tasks", "lambada", "--lambada-data", "x.jsonl"])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "mtnlg" / "pretrain.py"), *argv],
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "--lambada-data x.jsonl: no such file" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_task_results_logged_to_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mtnlg.training.metrics import MetricsLogger, read_metrics

    fields = {"lambada_accuracy": 0.25, "wikitext_adjusted_ppl": 80.5}
    with MetricsLogger(str(tmp_path / "m.jsonl"), str(tmp_path / "tb")) as log:
        log.log_tasks(100, fields)
    assert read_metrics(str(tmp_path / "m.jsonl")) == [
        {"kind": "tasks", "iteration": 100, **fields}
    ]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == [
        "tasks/lambada_accuracy",
        "tasks/wikitext_adjusted_ppl",
    ]
    (event,) = acc.Scalars("tasks/wikitext_adjusted_ppl")
    assert (event.step, event.value) == (100, pytest.approx(80.5))
