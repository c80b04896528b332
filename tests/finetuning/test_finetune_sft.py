"""``finetune.py --task sft`` through the driver: PP=2 from a Hugging Face GPT-2 folder.

The loss itself is checked against transformers in ``test_sft.py``; here the driver's path:
``--hf-model`` start, pipeline engine with (ids, (labels, loss mask)) batches, dev loss at
``--eval-interval``, the best checkpoint, and an ``--export-hf`` that loads in transformers as
``GPT2LMHeadModel`` and computes what the saved mtnlg checkpoint computes.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.finetuning.ft_runs import eval_records, finetune
from tests.inference.gen_helpers import TINY_MERGES, TINY_VOCAB, make_hf_gpt2

PAIRS = [
    ("Who is there?", "Nay, answer me: stand, and unfold yourself."),
    ("Long live the king!", "Bernardo?"),
    ("You come most carefully upon your hour.", "'Tis now struck twelve; get thee to bed."),
    ("For this relief much thanks:", "'tis bitter cold, and I am sick at heart."),
    ("Have you had quiet guard?", "Not a mouse stirring."),
    ("Well, good night.", "I think I hear them."),
]


@pytest.mark.timeout(600)
def test_sft_pp2_from_hf_exports_a_gpt2_lm(tmp_path):
    from transformers import GPT2LMHeadModel

    from mtnlg.checkpoint import load_full_state, load_into_model
    from mtnlg.model import GPTModel

    hf_dir = tmp_path / "gpt2"
    start = make_hf_gpt2(hf_dir, seed=1)
    for name, rows in (("train", PAIRS), ("dev", PAIRS[:3])):
        lines = [json.dumps({"prompt": p, "response": r}) for p, r in rows]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    argv = [
        "--task", "sft", "--hf-model", str(hf_dir),
        "--train-data", str(tmp_path / "train.jsonl"), "--valid-data", str(tmp_path / "dev.jsonl"),
        "--pipeline-model-parallel-size", "2", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
        "--lr", "1e-3", "--log-interval", "1", "--eval-interval", "2", "--no-progress",
        "--save", str(out / "ckpt"), "--export-hf", str(out / "hf"),
    ]  # fmt: skip
    run, evals = finetune(argv, 2, out)
    assert len(run.losses) == 4 and all(n > 0 for n in run.grad_norms)
    logged = eval_records(out / "metrics.jsonl")
    assert [r["iteration"] for r in logged] == [2, 4]
    assert [r["val_loss"] for r in logged] == [m["val_loss"] for _, m in evals]
    assert logged[1]["val_loss"] < logged[0]["val_loss"]  # it learns the dev responses too
    assert len(list((out / "ckpt" / "best").glob("iter_*"))) == 1

    hf = GPT2LMHeadModel.from_pretrained(out / "hf").eval()
    cfg, full, tok = load_full_state(out / "ckpt")
    assert (out / "hf" / "vocab.json").read_bytes() == TINY_VOCAB.read_bytes()
    assert (out / "hf" / "merges.txt").read_bytes() == TINY_MERGES.read_bytes()
    ours = GPTModel(cfg, seed=0)
    load_into_model(ours, full, 1, 0)
    ids = torch.tensor([tok.tokenize("Who is there? Nay, answer me")])
    with torch.no_grad():
        got = hf(ids).logits
        want = ours.eval().full_logits(ids)
        before = start(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert (got - before).abs().max() > 1e-3  # the export holds the fine-tuned weights
