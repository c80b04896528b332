"""SFT: loss equals transformers' with prompt labels -100; prompt tokens give no gradient."""

import argparse
import json
import sys

import numpy as np
import pytest
import torch

from mtnlg.checkpoint.api import load_full_state, load_into_model
from mtnlg.data.tokenizer import build_tokenizer
from mtnlg.finetuning.records import DataError, RecordSource
from mtnlg.finetuning.sft import add_sft_arguments, build_sft_examples, sft_micro_batch
from mtnlg.model.gpt import GPTModel
from tests.inference.gen_helpers import EOD, TINY_MERGES, TINY_VOCAB, make_hf_gpt2

SEQ = 32
ROWS = [
    {"prompt": "First Citizen: speak.", "response": "Speak, speak."},
    {"prompt": "What is the matter with you, my lord?", "response": "Nothing."},
    {"prompt": "Q", "response": 'He said: "Before we proceed any further, hear me."'},
]


def _args(*argv, truncate=False):
    parser = argparse.ArgumentParser()
    add_sft_arguments(parser)
    args = parser.parse_args(list(argv))
    args.truncate = truncate
    return args


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return RecordSource(path=str(path))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Our TP1 GPTModel converted from a random transformers GPT-2, both tokenizers."""
    from transformers import GPT2Tokenizer

    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    hf = make_hf_gpt2(folder, seed=3)
    cfg, full, _ = load_full_state(folder)
    ours = GPTModel(cfg, seed=0)
    load_into_model(ours, full, 1, 0)
    tok = build_tokenizer("GPT2BPETokenizer", str(TINY_VOCAB), str(TINY_MERGES))
    hf_tok = GPT2Tokenizer.from_pretrained(folder)  # vocab.json / merges.txt copied there
    return ours, hf, tok, hf_tok


def _batch(tmp_path, tok, rows=ROWS, micro=4):
    examples = build_sft_examples(_jsonl(tmp_path / "d.jsonl", rows), tok, SEQ, _args())
    return examples, sft_micro_batch(examples, micro, SEQ, EOD)


def test_examples_are_template_separator_response_eod(tmp_path, setup):
    _, _, tok, hf_tok = setup
    examples, _ = _batch(tmp_path, tok)
    for ex, row in zip(examples, ROWS, strict=True):
        prompt = hf_tok(row["prompt"] + "\n")["input_ids"]
        assert ex.ids.tolist() == prompt + hf_tok(row["response"])["input_ids"] + [EOD]
        assert ex.prompt_len == len(prompt) and not ex.truncated
    args = _args("--prompt-template", "Q: {prompt} ({who})\\nA:", "--response-separator", " ")
    src = _jsonl(tmp_path / "t.jsonl", [dict(ROWS[0], who="Menenius")])
    (ex,) = build_sft_examples(src, tok, SEQ, args)
    prompt = hf_tok("Q: First Citizen: speak. (Menenius)\nA: ")["input_ids"]
    assert ex.ids.tolist()[: ex.prompt_len] == prompt


def test_sft_loss_and_grads_equal_transformers(tmp_path, setup):
    ours, hf, tok, _ = setup
    examples, (ids, (labels, mask)) = _batch(tmp_path, tok)
    assert ids.shape == labels.shape == mask.shape == (4, SEQ) and mask[3].sum() == 0
    # transformers on the full token rows: labels -100 on the prompt and the padding.
    hf_ids = torch.full((4, SEQ + 1), EOD)
    hf_labels = torch.full((4, SEQ + 1), -100)
    for row, ex in enumerate(examples):
        t = torch.tensor(ex.ids.tolist())
        hf_ids[row, : len(t)] = t
        hf_labels[row, ex.prompt_len : len(t)] = t[ex.prompt_len :]
    assert (hf_labels != -100).sum() == mask.sum() == sum(e.response_len for e in examples)
    hf.zero_grad()
    ours.zero_grad()
    ref = hf(hf_ids, labels=hf_labels).loss
    ref.backward()
    loss = ours(ids, (labels, mask))
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5, (loss.item(), ref.item())
    wte = ours.embedding.word_embeddings.weight.grad[: hf.config.vocab_size]
    torch.testing.assert_close(wte, hf.transformer.wte.weight.grad, rtol=1e-4, atol=1e-6)
    qkv = ours.layers[1].attention.qkv.weight.grad
    torch.testing.assert_close(qkv, hf.transformer.h[1].attn.c_attn.weight.grad.t())


def _grads(model, ids, labels, mask):
    model.zero_grad()
    loss = model(ids, (labels, mask))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_prompt_tokens_give_zero_gradient(tmp_path, setup):
    ours, _, tok, _ = setup
    _, (ids, (labels, mask)) = _batch(tmp_path, tok)
    # Per position: d loss / d logits is exactly zero on prompt and padding positions.
    hidden = ours.hidden_states(ids)
    logits = ours.embedding.lm_logits(hidden, mask_padding=False)
    logits.retain_grad()
    ours.loss_fn(logits, (labels, mask)).backward()
    per_pos = logits.grad.abs().sum(-1)  # (m, s)
    assert torch.all(per_pos[mask == 0] == 0) and torch.all(per_pos[mask == 1] > 0)
    # Any targets at masked positions: the same loss and bit-identical parameter gradients.
    loss, grads = _grads(ours, ids, labels, mask)
    other = torch.where(mask == 0, torch.randint_like(labels, 0, 5000), labels)
    assert not torch.equal(other, labels)
    loss2, grads2 = _grads(ours, ids, other, mask)
    assert torch.equal(loss, loss2) and all(map(torch.equal, grads, grads2))
    # ...while changing one response target does change them (the check can fail).
    resp = torch.nonzero(mask)[0]
    changed = labels.clone()
    changed[tuple(resp)] = (changed[tuple(resp)] + 1) % 5000
    loss3, _ = _grads(ours, ids, changed, mask)
    assert not torch.equal(loss, loss3)


def test_validation_names_file_and_line(tmp_path, setup):
    tok = setup[2]
    bad = [dict(ROWS[0]), {"prompt": "  ", "response": "x"}]
    with pytest.raises(DataError, match=r"d.jsonl:2: empty prompt \(--prompt-key prompt\)"):
        _batch(tmp_path, tok, bad)
    with pytest.raises(DataError, match=r"d.jsonl:1: empty response"):
        _batch(tmp_path, tok, [{"prompt": "a", "response": ""}])
    with pytest.raises(DataError, match=r"d.jsonl:2: no column 'response' \(--response-key\)"):
        _batch(tmp_path, tok, [ROWS[0], {"prompt": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: response \(--response-key response\) is int"):
        _batch(tmp_path, tok, [{"prompt": "a", "response": 3}])
    long = [ROWS[0], {"prompt": "word " * 40, "response": "ok"}]
    with pytest.raises(DataError, match=r"d.jsonl:2: \d+ tokens .* --seq-length 32 \+ 1; .*--tru"):
        _batch(tmp_path, tok, long)
    with pytest.raises(DataError, match=r"d.jsonl:1: --prompt-template names column 'who'"):
        build_sft_examples(
            _jsonl(tmp_path / "d.jsonl", ROWS), tok, SEQ, _args("--prompt-template", "{who}")
        )
    with pytest.raises(DataError, match=r"--prompt-template '\{0\}': field \{0\} must name"):
        build_sft_examples(
            _jsonl(tmp_path / "d.jsonl", ROWS), tok, SEQ, _args("--prompt-template", "{0}")
        )


def test_truncate_left_prompt_then_right_response(tmp_path, setup, capsys):
    _, _, tok, hf_tok = setup
    rows = [
        ROWS[0],
        {"prompt": "word " * 40 + "tail", "response": "ok"},
        {"prompt": "short", "response": "many words " * 30},
    ]
    src = _jsonl(tmp_path / "d.jsonl", rows)
    exs = build_sft_examples(src, tok, SEQ, _args(truncate=True), log=sys.stderr)
    assert [e.truncated for e in exs] == ["", "prompt", "response"]
    assert all(len(e.ids) <= SEQ + 1 for e in exs) and len(exs[1].ids) == SEQ + 1
    full_prompt = hf_tok(rows[1]["prompt"] + "\n")["input_ids"]
    resp = hf_tok("ok")["input_ids"] + [EOD]
    assert exs[1].ids.tolist() == full_prompt[-(SEQ + 1 - len(resp)) :] + resp
    prompt = hf_tok("short\n")["input_ids"]
    assert exs[2].ids.tolist()[: exs[2].prompt_len] == prompt  # short prompt kept whole
    assert (
        exs[2].ids.tolist()[exs[2].prompt_len :]
        == hf_tok(rows[2]["response"])["input_ids"][: SEQ + 1 - len(prompt)]
    )  # cut on the right, no EOD
    err = capsys.readouterr().err
    assert "3 examples" in err and "; 1 prompts left-truncated; 1 responses cut" in err
    ids, (labels, mask) = sft_micro_batch(exs, 3, SEQ, EOD)
    assert mask.sum(1).tolist() == [e.response_len for e in exs]
    with pytest.raises(ValueError, match="4 examples for a micro-batch of 3"):
        sft_micro_batch([*exs, exs[0]], 3, SEQ, EOD)


def test_hf_dataset_input_equals_jsonl(tmp_path, setup):
    from datasets import Dataset

    tok = setup[2]
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    from_hf = build_sft_examples(RecordSource(hf_dataset=str(tmp_path / "ds")), tok, SEQ, _args())
    from_jsonl, _ = _batch(tmp_path, tok)
    assert [(e.prompt_len, e.ids.tolist()) for e in from_hf] == [
        (e.prompt_len, e.ids.tolist()) for e in from_jsonl
    ]
    assert from_hf[2].where == f"hf:{tmp_path / 'ds'}[train]#2"
    assert np.all(from_hf[0].ids >= 0)
