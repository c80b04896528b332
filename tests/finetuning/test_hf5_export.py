"""Fine-tuning from a GPT-2 folder as ``transformers`` 5 saves it (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``; no ``special_tokens_map.json``).

A classifier trained at TP2 x PP2 from such a folder exports through ``--export-hf``, and the
export, loaded by ``AutoModelForSequenceClassification`` + ``AutoTokenizer`` and fed the RAW
dev-file texts (SST-2 sentences end in a space), predicts what ``--predict`` predicts and
scores the logged dev accuracy and loss: the run trains and evaluates on the tokens ``transformers``
gives for those texts. The chat template of the source folder survives into the export. A
tokenizer whose files cannot be exported stops the run before training.
"""

from __future__ import annotations

import pytest
import torch

from tests.checkpoint.hf5_folders import CHAT_TEMPLATE, make_hf5_gpt2
from tests.finetuning.ft_runs import eval_records, finetune, run_cli, sst2_sample

SEQ = 64
ITERS = 4


def _argv(hf: str, train, dev, out, tp=2, pp=2) -> list[str]:
    return [
        "--task", "classification", "--hf-model", hf,
        "--train-data", str(train), "--valid-data", str(dev), "--truncate",
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", str(ITERS), "--lr", "2e-3", "--lr-warmup-iters", "1", "--seed", "7",
        "--log-interval", "1", "--eval-interval", str(ITERS), "--no-progress",
        "--save", str(out / "ckpt"), "--export-hf", str(out / "hf"),
    ]  # fmt: skip


@pytest.mark.timeout(900)
def test_tp2_pp2_classifier_from_hf5_folder_exports_what_it_predicts(tmp_path):
    from sklearn.metrics import accuracy_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = tmp_path / "gpt2"
    make_hf5_gpt2(src, n_layer=2, n_positions=SEQ)
    assert not (src / "special_tokens_map.json").exists()  # as transformers 5 saves it
    assert (src / "tokenizer.json").is_file() and (src / "chat_template.jinja").is_file()
    train, dev = sst2_sample(tmp_path, "train", 48), sst2_sample(tmp_path, "dev", 32)
    out = tmp_path / "run"
    finetune(_argv(str(src), train, dev, out), 4, out, timeout=800)
    export = out / "hf"
    assert (export / "config.json").is_file(), "the export was not written"

    rows = [line.split("\t") for line in dev.read_text(encoding="utf-8").splitlines()[1:]]
    texts, gold = [r[0] for r in rows], [r[1] for r in rows]
    assert all(t.endswith(" ") for t in texts)  # the raw SST-2 text: a trailing space

    tok = AutoTokenizer.from_pretrained(export)
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.pad_token == "<|endoftext|>" and tok.padding_side == "right"
    hf = AutoModelForSequenceClassification.from_pretrained(export).eval()
    gold_idx = torch.tensor([hf.config.label2id[g] for g in gold])

    def hf_run(batch: list[str]):
        enc = tok(batch, padding=True, truncation=True, max_length=SEQ, return_tensors="pt")
        with torch.no_grad():
            logits = hf(**enc).logits
        loss = torch.nn.functional.cross_entropy(logits, gold_idx).item()
        return [hf.config.id2label[i] for i in logits.argmax(-1).tolist()], loss

    theirs, their_loss = hf_run(texts)
    labels = tmp_path / "labels.txt"
    proc = run_cli(
        ["--task", "classification", "--predict", str(dev), "--load", str(out / "ckpt"),
         "--output", str(labels), "--micro-batch-size", "4", "--truncate",
         "--seq-length", str(SEQ)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = labels.read_text().splitlines()
    assert ours == theirs
    (final,) = eval_records(out / "metrics.jsonl")  # one evaluation: best == final == export
    assert final["iteration"] == ITERS
    assert final["val_accuracy"] == pytest.approx(accuracy_score(gold, theirs), abs=1e-9)
    # the logged dev loss is transformers' on the raw texts (a continuous check: the labels of
    # a barely trained classifier may not move when the tokens do); stripped texts differ
    assert their_loss == pytest.approx(final["val_loss"], rel=1e-5)
    _, stripped_loss = hf_run([t.strip() for t in texts])
    assert abs(stripped_loss - final["val_loss"]) > 1e-3 * final["val_loss"]


BAD_TOKENIZER = {  # file -> (its content, the message); neither stops a run before this fix
    "special_tokens_map.json": ('{"eos_token": "<|endoftext|>",', "not valid JSON"),
    "tokenizer_config.json": (
        '{"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", '
        '"add_prefix_space": true}',
        "the exported tokenizer encodes",
    ),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fname", sorted(BAD_TOKENIZER))
def test_tokenizer_that_cannot_export_stops_the_run_before_training(tmp_path, fname):
    """A broken special_tokens_map.json (the classifier export rewrites it), or a config that
    makes transformers tokenize otherwise than the run (add_prefix_space), fails at the start
    with --export-hf, naming the problem, not at the export step after training."""
    src = tmp_path / "gpt2"
    make_hf5_gpt2(src, n_layer=2, n_positions=SEQ)
    text, message = BAD_TOKENIZER[fname]
    (src / fname).write_text(text)
    train, dev = sst2_sample(tmp_path, "train", 8), sst2_sample(tmp_path, "dev", 4)
    out = tmp_path / "run"
    argv = _argv(str(src), train, dev, out, tp=1, pp=1)
    proc = run_cli([*argv, "--metrics-file", str(out / "metrics.jsonl")])
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "iteration" not in proc.stdout and not (out / "ckpt").exists()
    assert not (out / "metrics.jsonl").exists()
