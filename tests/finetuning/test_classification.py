"""Classification fine-tuning: TP2 x PP2 against TP1, the Hugging Face export, prediction.

Real SST-2 records (48 train, 19 dev: the odd dev size leaves filler rows in the last
micro-batches). The reference is one process with one micro-batch of 8; the layout run is
TP=2 x PP=2 (4 processes started by the real ``deepspeed`` launcher, 4 micro-batches of 2,
the head on the last pipeline stage). Tolerances are for fp32 sums reordered by the layout
only: 2e-6 relative on losses and gradient norms (the pretraining equivalence tests' 1e-6,
doubled for a gradient-norm spike, see ``LOSS_RTOL``), 1e-5 absolute on weights.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.e2e.pretrain_runs import assert_equivalent, max_rel
from tests.finetuning.ft_runs import (
    ITERS,
    classification_args,
    classifier_weights,
    eval_records,
    finetune,
    launch,
    run_cli,
    sst2_sample,
)

# 2e-6: on the raw SST-2 texts (trailing space kept, as transformers tokenizes them) the
# gradient norm spikes to ~13 at iteration 4, after which the layout's fp32 reordering shows at
# up to 1.4e-6 relative on losses and norms
LOSS_RTOL = NORM_RTOL = 2e-6
WEIGHT_ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    train, dev = sst2_sample(root, "train", 48), sst2_sample(root, "dev", 19)
    ref_dir, lay_dir = root / "tp1", root / "tp2pp2"
    ref, ref_evals = finetune(
        classification_args(train, dev, mb=8, extra=["--save", str(ref_dir / "ckpt")]), 1, ref_dir
    )
    argv = classification_args(
        train,
        dev,
        tp=2,
        pp=2,
        extra=["--save", str(lay_dir / "ckpt"), "--export-hf", str(lay_dir / "hf")],
    )
    lay = launch(argv, 4, lay_dir)
    for run, d in ((ref, ref_dir), (lay, lay_dir)):
        run.weights = classifier_weights(d / "ckpt")
    return {
        "root": root,
        "train": train,
        "dev": dev,
        "ref": ref,
        "ref_evals": ref_evals,
        "lay": lay,
        "lay_dir": lay_dir,
    }


@pytest.mark.timeout(900)
def test_tp2_pp2_matches_tp1(runs):
    """Per-iteration loss and gradient norm, every final weight (head included), dev metrics."""
    ref, lay = runs["ref"], runs["lay"]
    assert len(ref.losses) == ITERS
    assert "score.weight" in ref.weights and ref.weights["score.weight"].shape == (2, 64)
    assert_equivalent(lay, ref, LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL)
    got = eval_records(runs["lay_dir"] / "metrics.jsonl")
    want = [m for _, m in runs["ref_evals"]]
    assert [r["iteration"] for r in got] == [3, 6]
    assert max_rel([r["val_loss"] for r in got], [m["val_loss"] for m in want]) <= LOSS_RTOL
    assert [r["val_accuracy"] for r in got] == [m["val_accuracy"] for m in want]


@pytest.mark.timeout(600)
def test_dp2_zero2_matches_tp1(runs, tmp_path):
    """Plain engine at DP=2 with ZeRO-2 (2 micro-batches of 2 per rank): the same losses,
    gradient norms, final weights and dev metrics (the dev set split over the DP ranks)."""
    argv = classification_args(
        runs["train"], runs["dev"], extra=["--zero-stage", "2", "--save", str(tmp_path / "ckpt")]
    )
    got, evals = finetune(argv, 2, tmp_path)
    got.weights = classifier_weights(tmp_path / "ckpt")
    assert_equivalent(got, runs["ref"], LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL)
    want = [m for _, m in runs["ref_evals"]]
    assert max_rel([m["val_loss"] for _, m in evals], [m["val_loss"] for m in want]) <= LOSS_RTOL
    assert [m["val_f1"] for _, m in evals] == [m["val_f1"] for m in want]


def _our_logits(weights: dict, cfg, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    from mtnlg.checkpoint import shard_state
    from mtnlg.model.classification import GPTClassifier, pooled

    model = GPTClassifier(cfg, 2, seed=0)
    model.load_state_dict(shard_state(weights, cfg, 1, 0), strict=True)
    with torch.no_grad():
        return pooled(model.eval()(ids), last)


@pytest.mark.timeout(300)
def test_export_gives_our_logits_on_a_padded_batch(runs):
    """GPT2ForSequenceClassification from --export-hf vs our model on right-padded rows of
    different lengths, tokenized and padded by the exported tokenizer."""
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    from mtnlg.checkpoint.classification import ClassifierCheckpoint
    from mtnlg.model.classification import last_token_index

    folder = runs["lay_dir"] / "hf"
    hf = GPT2ForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    conf = json.loads((folder / "config.json").read_text())
    assert conf["architectures"] == ["GPT2ForSequenceClassification"]
    assert conf["id2label"] == {"0": "0", "1": "1"} and conf["pad_token_id"] == 4999
    texts = [
        "a gorgeous , witty , seductive movie .",
        "dull",
        "it 's not a bad film , but it is long",
    ]
    enc = tok(texts, padding=True, return_tensors="pt")
    lengths = enc["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == 3 and enc["input_ids"][1, -1] == 4999  # right-padded
    best = runs["lay_dir"] / "ckpt" / "best"  # what --export-hf exported
    ckpt = ClassifierCheckpoint(best)
    ours = _our_logits(
        classifier_weights(best),
        ckpt.cfg,
        enc["input_ids"],
        last_token_index(enc["input_ids"], 4999),
    )
    with torch.no_grad():
        theirs = hf(**enc).logits
    assert ours.shape == theirs.shape == (3, 2)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours, theirs)
    assert (ours[:, 0] - ours[:, 1]).abs().min() > 0  # not a degenerate constant


@pytest.mark.timeout(300)
def test_dev_metrics_and_prediction_at_another_layout(runs, tmp_path):
    """``--predict`` at TP=1 from the TP2 x PP2 best checkpoint (the one --export-hf exports)
    gives the exported model's argmax labels on the raw dev texts, one per input line; the
    logged dev accuracy and macro-F1 of that evaluation are scikit-learn's on those
    predictions; --save/best holds the best evaluation's iteration only."""
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    dev, lay_dir = runs["dev"], runs["lay_dir"]
    out = tmp_path / "labels.txt"
    proc = run_cli(
        ["--task", "classification", "--predict", str(dev), "--load", str(lay_dir / "ckpt" / "best"),
         "--output", str(out), "--micro-batch-size", "4", "--truncate", "--seq-length", "32"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = out.read_text().splitlines()
    rows = [line.split("\t") for line in dev.read_text().splitlines()[1:]]
    assert len(labels) == len(rows) == 19
    hf = GPT2ForSequenceClassification.from_pretrained(lay_dir / "hf").eval()
    tok = AutoTokenizer.from_pretrained(lay_dir / "hf")
    enc = tok(
        [r[0] for r in rows],  # the raw text, trailing space and all, as --predict reads it
        padding=True,
        truncation=True,
        max_length=32,
        return_tensors="pt",
    )
    with torch.no_grad():
        want = [hf.config.id2label[i] for i in hf(**enc).logits.argmax(-1).tolist()]
    assert labels == want
    gold = [r[1] for r in rows]
    evals = eval_records(lay_dir / "metrics.jsonl")
    best = max(evals, key=lambda r: r["val_accuracy"])  # the first of equals is kept
    assert best["val_accuracy"] == pytest.approx(accuracy_score(gold, labels), abs=1e-9)
    assert best["val_f1"] == pytest.approx(f1_score(gold, labels, average="macro"), abs=1e-9)
    tags = sorted(p.name for p in (lay_dir / "ckpt" / "best").glob("iter_*"))
    assert tags == [f"iter_{best['iteration']:07d}"]
