"""Bad fine-tuning input stops ``finetune.py`` before any training: the message names the
file and line, the exit status is non-zero, and nothing is saved or logged."""

from __future__ import annotations

import json

import pytest

from tests.finetuning.ft_runs import model_args, run_cli

GOOD = ["sentence\tlabel", "a fine film\t1", "a dull film\t0", "not bad at all\t1"]


def _case(tmp_path, name: str) -> tuple[list[str], str]:
    """(extra argv, expected message) for one kind of bad input."""
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text("\n".join(GOOD) + "\n")
    dev.write_text("\n".join(GOOD) + "\n")
    argv = ["--train-data", str(train), "--valid-data", str(dev)]
    if name == "missing column":
        dev.write_text("text\tlabel\nfine\t1\n")
        return argv, f"{dev}:2: no column 'sentence' (--text-column); columns: text, label"
    if name == "bad label":
        dev.write_text("\n".join([*GOOD[:3], "so so\t2"]) + "\n")
        return argv, f"{dev}:4: label '2' is not in the label set ['0', '1']"
    if name == "empty text":
        train.write_text("\n".join([GOOD[0], GOOD[1], "   \t0", GOOD[3]]) + "\n")
        return argv, f"{train}:3: empty text (--text-column 'sentence')"
    long = tmp_path / "train.jsonl"
    rows = [{"sentence": "short", "label": 0}, {"sentence": "word " * 40, "label": 1}]
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--train-data", str(long)], f"{long}:2: 41 tokens exceed --seq-length 32"  # 40 + " "


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["missing column", "bad label", "empty text", "too long"])
def test_bad_input_is_refused_before_training(tmp_path, name):
    extra, message = _case(tmp_path, name)
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    argv = ["--task", "classification", *extra, *model_args(), "--train-iters", "2",
            "--save", str(save), "--metrics-file", str(metrics)]  # fmt: skip
    proc = run_cli(argv)
    assert proc.returncode != 0
    assert f"error: {message}" in proc.stderr, proc.stderr[-2000:]
    assert "iteration" not in proc.stdout and not save.exists() and not metrics.exists()


@pytest.mark.timeout(300)
def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    """lr 0.05 makes the dev loss rise after the third step: with patience 2 the run stops at
    iteration 5 and --save/best holds iteration 3, the lowest dev loss (--best-metric loss)."""
    from mtnlg.training.metrics import read_metrics
    from tests.finetuning.ft_runs import sst2_sample

    train, dev = sst2_sample(tmp_path, "train", 16), sst2_sample(tmp_path, "dev", 8)
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    argv = ["--task", "classification", "--train-data", str(train), "--valid-data", str(dev),
            "--truncate", *model_args(), "--micro-batch-size", "8", "--train-iters", "20",
            "--lr", "0.05", "--eval-interval", "1", "--early-stop-patience", "2",
            "--best-metric", "loss", "--save", str(save), "--metrics-file", str(metrics)]  # fmt: skip
    proc = run_cli(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["val_loss"] for r in read_metrics(str(metrics), "eval")]
    assert len(losses) == 5 and min(losses) == losses[2] < losses[3] < losses[4]
    assert "early stop at iteration 5" in proc.stdout
    assert sorted(p.name for p in (save / "best").glob("iter_*")) == ["iter_0000003"]
    assert (save / "latest").read_text().strip() == "iter_0000005"


def test_help_lists_both_tasks_flags():
    proc = run_cli(["--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("usage:")
    for flag in ("--task", "--text-column", "--predict", "--prompt-key", "--export-hf", "--lr"):
        assert flag in proc.stdout


@pytest.mark.parametrize(
    "flag,message",
    [
        (["--keep-last", "2"], "--keep-last is not supported by fine-tuning"),
        (["--no-verify-checkpoint-hash"], "--no-verify-checkpoint-hash is not supported"),
    ],
)
def test_pretraining_only_checkpoint_flags_are_refused(tmp_path, flag, message):
    """Flags the shared parser offers but fine-tuning does not honour are refused, not ignored."""
    from mtnlg.finetuning.arguments import build_finetune_parser, check_flags

    train = tmp_path / "train.tsv"
    train.write_text("\n".join(GOOD) + "\n")
    argv = ["--task", "classification", "--train-data", str(train), "--train-iters", "2", *flag]
    args = build_finetune_parser("t").parse_args(argv)
    with pytest.raises(ValueError, match=message):
        check_flags(args)
