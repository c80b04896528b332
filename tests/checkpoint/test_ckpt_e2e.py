"""Real checkpoints through DeepSpeed: train at TP=2 x PP=2, convert, evaluate, resume.

One 4-process run trains 6 iterations (saving at 3 and 6); conversions run in the test process;
a second 4-process run evaluates and resumes (evaluate.py / pretrain.py drivers, in-process).
"""

from __future__ import annotations

import math

import pytest
import torch

from mtnlg.checkpoint import load_full_state, load_into_model
from mtnlg.checkpoint.convert import hf_to_mtnlg, mtnlg_to_hf, reshard
from mtnlg.model import GPTModel
from tests.checkpoint.conftest import TEXT
from tests.e2e.conftest import ROOT, TINY_MERGES, TINY_VOCAB
from tests.e2e.test_pretrain import _pretrain, base_args
from tests.helpers.dist import run_distributed


def _jobs(rank, world_size, jobs):
    """Run evaluate.py / pretrain.py drivers one after another in the same process group."""
    from mtnlg.evaluation import run as ev
    from mtnlg.training import checkpointing, pretrain
    from mtnlg.training.arguments import build_parser

    out = []
    for kind, argv in jobs:
        if kind == "eval":
            args = ev.build_parser("eval").parse_args(argv)
            out.append(ev._run(args, checkpointing.read_meta(args.load))["loss"])
        else:
            progress = pretrain._run(build_parser("train").parse_args(argv))
            out.append([loss for _, loss in progress.losses])
    return out


def hf_text_loss(folder, ids, seq):
    """evaluate.py's windows (seq+1 tokens, non-overlapping, last partial kept) through HF."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for i in range(0, len(ids), seq + 1):
        w = torch.tensor(ids[i : i + seq + 1])
        if len(w) < 2:
            continue
        with torch.no_grad():
            logits = m(w[None, :-1]).logits[0]
        nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        n += len(w) - 1
    return nll / n


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    from mtnlg.data.preprocess import run as preprocess

    out = tmp_path_factory.mktemp("data") / "shk"
    preprocess(
        ["--input", str(ROOT / "data" / "demo" / "shakespeare.jsonl"), "--output-prefix", str(out)]
        + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(TINY_VOCAB)]
        + ["--merge-file", str(TINY_MERGES), "--append-eod", "--workers", "1"]
    )
    return str(out) + "_text_document"


@pytest.mark.timeout(900)
def test_train_convert_evaluate_resume(prefix, hf_dir, tmp_path):
    from mtnlg.data.tokenizer import load_tokenizer

    ck = tmp_path / "c22"
    save = ["--save", str(ck), "--save-interval", "3"]
    straight = run_distributed(
        _pretrain,
        4,
        args=(base_args(prefix, tp=2, pp=2, iters=6, extra=save),),
        timeout=400,
        start_method="forkserver",
    )[0]

    # trained TP=2 x PP=2 -> HF: logits equal the mtnlg model's
    hf = tmp_path / "hf"
    mtnlg_to_hf(str(ck), str(hf), weights_only=True)  # HF holds weights only
    cfg, full, tok = load_full_state(ck)
    model = GPTModel(cfg).eval()
    load_into_model(model, full, 1, 0)
    ids = torch.tensor([tok.tokenize(TEXT)[:32]])
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model.full_logits(ids), atol=1e-4, rtol=0)

    # reshard TP2xPP2 -> TP1xPP1 -> TP4xPP1 (latest for evaluation, iteration 3 for resuming)
    for tag, name in [(None, "r"), ("iter_0000003", "r3")]:
        reshard(str(ck), str(tmp_path / f"{name}11"), 1, 1, tag=tag)
        reshard(str(tmp_path / f"{name}11"), str(tmp_path / f"{name}41"), 4, 1)
    # HF GPT-2 -> mtnlg TP=2 x PP=2 (weights only)
    imp = tmp_path / "imp"
    hf_to_mtnlg(str(hf_dir), str(imp), 2, 2, make_vocab_size_divisible_by=8)

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    ev = ["--text-file", str(text)]
    resume = base_args(prefix, tp=4, iters=6, extra=["--load", str(tmp_path / "r341")])
    # the imported model has 2 layers (a --load refuses model flags that contradict it)
    cont = base_args(prefix, tp=2, pp=2, iters=2, extra=["--num-layers", "2", "--load", str(imp)])
    jobs = [
        ("eval", ["--load", str(ck), *ev]),
        ("eval", ["--load", str(tmp_path / "r41"), *ev]),
        ("eval", ["--load", str(imp), *ev]),
        ("train", resume),
        ("train", cont),
    ]
    loss22, loss41, loss_imp, resumed, continued = run_distributed(
        _jobs, 4, args=(jobs,), timeout=500, start_method="forkserver"
    )[0]

    assert loss41 == pytest.approx(loss22, rel=1e-6)  # evaluation unchanged by resharding
    assert resumed == pytest.approx(straight[3:], rel=1e-4)  # optimizer state moved exactly
    tok_hf = load_tokenizer(imp / "iter_0000000" / "tokenizer")
    ref = hf_text_loss(hf_dir, tok_hf.tokenize(TEXT), 32)
    assert loss_imp == pytest.approx(ref, rel=1e-4)
    assert math.exp(loss_imp) == pytest.approx(math.exp(ref), rel=1e-4)
    assert len(continued) == 2 and all(math.isfinite(x) for x in continued)
