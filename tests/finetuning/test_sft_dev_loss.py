"""SFT's dev loss and perplexity are per token: the summed NLL of every response token (and EOD)
of the dev set over their number, whatever the micro-batch size. Checked against the exported
``GPT2LMHeadModel`` scoring the same token sequences in the test (transformers' logits, the
test's own log-softmax), at micro-batch 1 and 2 over dev examples of different lengths, where a
mean of per-batch means would differ."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.finetuning.ft_runs import finetune
from tests.finetuning.test_finetune_sft import PAIRS
from tests.inference.gen_helpers import make_hf_gpt2

DEV = [PAIRS[1], PAIRS[3], PAIRS[4]]  # responses of 3, 12 and 5 words


def _reference(hf_dir, dev_path, argv) -> float:
    """Per-token NLL of the dev set's response tokens + EOD under the exported model."""
    from transformers import GPT2LMHeadModel

    from mtnlg.data.tokenizer import build_tokenizer
    from mtnlg.finetuning.arguments import build_finetune_parser
    from mtnlg.finetuning.records import RecordSource
    from mtnlg.finetuning.sft import build_sft_examples

    args = build_finetune_parser("t").parse_args(argv)
    tok = build_tokenizer("GPT2BPETokenizer", hf_dir / "vocab.json", hf_dir / "merges.txt")
    exs = build_sft_examples(RecordSource(path=str(dev_path)), tok, 32, args)
    hf = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float64).eval()
    nll, n = 0.0, 0
    for ex in exs:
        ids = torch.tensor(ex.ids.astype("int64"))[None]
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0, :-1], dim=-1)  # (t-1, V)
        target = ids[0, 1:]
        picked = -logp[torch.arange(len(target)), target]
        nll += float(picked[ex.prompt_len - 1 :].sum())  # position j predicts token j + 1
        n += len(target) - (ex.prompt_len - 1)
    return nll / n


@pytest.mark.timeout(600)
@pytest.mark.parametrize("micro", [1, 2])
def test_sft_dev_loss_is_per_token(tmp_path, micro):
    start = tmp_path / "gpt2"
    make_hf_gpt2(start, seed=2)
    for name, rows in (("train", PAIRS), ("dev", DEV)):
        lines = [json.dumps({"prompt": p, "response": r}) for p, r in rows]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    argv = [
        "--task", "sft", "--hf-model", str(start),
        "--train-data", str(tmp_path / "train.jsonl"), "--valid-data", str(tmp_path / "dev.jsonl"),
        "--seq-length", "32", "--micro-batch-size", str(micro), "--global-batch-size", "2",
        "--train-iters", "1", "--lr", "1e-3", "--eval-interval", "1", "--no-progress",
        "--save", str(out / "ckpt"), "--export-hf", str(out / "hf"),
    ]  # fmt: skip
    _, evals = finetune(argv, 1, out)
    (_, metrics) = evals[-1]
    want = _reference(out / "hf", tmp_path / "dev.jsonl", argv)
    assert metrics["val_loss"] == pytest.approx(want, rel=1e-5)
    assert metrics["val_ppl"] == pytest.approx(math.exp(want), rel=1e-5)
