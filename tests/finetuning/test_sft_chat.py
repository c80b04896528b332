"""``finetune.py --task sft --chat-template``: conversations formatted with the tokenizer's own
chat template. The ids equal ``transformers``' ``apply_chat_template``; the loss counts exactly
the assistant turns (their content and end-of-turn text, computed in the test from the known
template), equal to transformers' loss with labels -100 elsewhere, so the other tokens get no
gradient; a run from a transformers-5-saved folder exports a model whose tokenizer carries the
template."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mtnlg.finetuning.records import DataError, RecordSource
from tests.checkpoint.hf5_folders import make_hf5_gpt2
from tests.finetuning.ft_runs import finetune

CONVS = [
    [{"role": "user", "content": "Who is there?"},
     {"role": "assistant", "content": "Nay, answer me: stand, and unfold yourself."}],
    [{"role": "system", "content": "Speak as Hamlet."},
     {"role": "user", "content": "How now?"},
     {"role": "assistant", "content": "Not a mouse stirring."},
     {"role": "user", "content": "Well, good night."},
     {"role": "assistant", "content": "I think I hear them."}],
]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf5chat")
    make_hf5_gpt2(d, n_positions=128)  # the longer conversation has 77 tokens
    return d


def _write(path, convs):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


def _examples(folder, path, seq=96, truncate=False):
    from mtnlg.checkpoint import load_full_state
    from mtnlg.finetuning.chat import build_chat_examples

    _, _, tok = load_full_state(folder)
    args = SimpleNamespace(messages_key="messages", truncate=truncate)
    return build_chat_examples(RecordSource(path=str(path)), tok, seq, args)


def _hf_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_ids_and_assistant_mask_equal_transformers(folder, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    exs = _examples(folder, _write(tmp_path / "c.jsonl", CONVS))
    for ex, conv in zip(exs, CONVS):
        assert ex.ids.tolist() == _hf_ids(hf, conv)
        want = [hf(m["content"] + "<|endoftext|>\n", add_special_tokens=False)["input_ids"]
                for m in conv if m["role"] == "assistant"]  # fmt: skip
        got, run = [], []
        for t, m in zip(ex.ids.tolist(), ex.mask.tolist()):
            if m:
                run.append(t)
            elif run:
                got, run = [*got, run], []
        got += [run] if run else []
        assert got == want


@torch.no_grad()
def test_loss_counts_assistant_tokens_only(folder, tmp_path):
    """Our masked loss = transformers' loss with labels -100 outside the assistant turns."""
    from transformers import GPT2LMHeadModel

    from mtnlg.checkpoint import load_full_state, load_into_model
    from mtnlg.finetuning.sft import sft_micro_batch
    from mtnlg.model import GPTModel

    (ex,) = _examples(folder, _write(tmp_path / "c.jsonl", CONVS[1:]))
    cfg, full, tok = load_full_state(folder)
    model = GPTModel(cfg).eval()
    load_into_model(model, full, 1, 0)
    ids, (labels, mask) = sft_micro_batch([ex], 1, len(ex.ids) - 1, tok.eod)
    ours = model(ids, (labels, mask))
    hf = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    target = torch.tensor(ex.ids.astype(np.int64))[None]
    hf_labels = torch.where(torch.tensor(ex.mask[None]).bool(), target, -100)
    theirs = hf(target, labels=hf_labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_refusals(folder, tmp_path):
    bad = [[{"role": "user", "content": "no answer"}]]
    with pytest.raises(DataError, match="no assistant message"):
        _examples(folder, _write(tmp_path / "a.jsonl", bad))
    bad = [[{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]]
    with pytest.raises(DataError, match=r"a\.jsonl:1: messages\[0\] role 'narrator'"):
        _examples(folder, _write(tmp_path / "a.jsonl", bad))
    with pytest.raises(DataError, match="more than --seq-length 8"):
        _examples(folder, _write(tmp_path / "b.jsonl", CONVS), seq=8)
    cut = _examples(folder, _write(tmp_path / "b.jsonl", CONVS), seq=40, truncate=True)
    assert [len(e.ids) <= 41 for e in cut] == [True, True]
    assert [e.truncated for e in cut] == ["", "response"]  # 37 tokens kept, 77 cut to 41


@pytest.mark.timeout(600)
def test_finetune_chat_exports_with_template(folder, tmp_path):
    from transformers import AutoTokenizer

    data = _write(tmp_path / "train.jsonl", CONVS * 2)
    out = tmp_path / "run"
    argv = [
        "--task", "sft", "--chat-template", "--hf-model", str(folder),
        "--train-data", str(data), "--valid-data", str(data),
        "--seq-length", "96", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--train-iters", "2", "--lr", "1e-3", "--log-interval", "1", "--eval-interval", "2",
        "--no-progress",
        "--save", str(out / "ckpt"), "--export-hf", str(out / "hf"),
    ]  # fmt: skip
    run, evals = finetune(argv, 1, out)
    assert len(run.losses) == 2 and evals
    exported = AutoTokenizer.from_pretrained(out / "hf")
    assert exported.chat_template == AutoTokenizer.from_pretrained(folder).chat_template
