"""distill.py end to end: a TP=1 teacher distilled at TP=2, exact resume, HF export.

The teacher is a short pretraining run on the demo corpus (tiny vocabulary); the student has
half its layers, initialised from teacher blocks 0 and 2.
"""

from __future__ import annotations

import pytest
import torch

from tests.e2e import conftest as e2e
from tests.e2e.conftest import TINY_MERGES, TINY_VOCAB
from tests.e2e.test_pretrain import base_args
from tests.helpers.dist import run_distributed

_demo_data = e2e.demo_prefix  # the e2e session fixture, registered here as `_demo_data`


def _pretrain(rank, world_size, argv):
    from mtnlg.training.pretrain import run

    run(argv)


def _distill(rank, world_size, argv):
    from mtnlg.distillation.driver import run

    return [loss for _, loss in run(argv).losses]


@pytest.fixture(scope="module")
def teacher(_demo_data, tmp_path_factory) -> str:
    save = str(tmp_path_factory.mktemp("teacher") / "ckpt")
    run_distributed(
        _pretrain,
        1,
        args=(base_args(_demo_data, iters=12, extra=["--save", save]),),
        timeout=300,
        start_method="forkserver",
    )
    return save


def distill_args(prefix, teacher, tp=2, iters=6, extra=()):
    return [
        "--teacher", teacher,
        "--student-num-layers", "2",
        "--student-init", "teacher-layers",
        "--student-init-layers", "0,2",
        "--kd-temperature", "2.0",
        "--kd-alpha", "0.5",
        "--tensor-model-parallel-size", str(tp),
        "--seq-length", "32",
        "--hidden-dropout", "0.1",
        "--attention-dropout", "0.1",
        "--micro-batch-size", "2",
        "--global-batch-size", "4",
        "--train-iters", str(iters),
        "--lr", "1e-3",
        "--seed", "11",
        "--data-path", prefix,
        "--split", "95,5,0",
        "--vocab-file", str(TINY_VOCAB),
        "--merge-file", str(TINY_MERGES),
        "--eval-interval", "1000",
        "--eval-iters", "1",
        "--log-interval", "3",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def losses(argv, world_size):
    out = run_distributed(
        _distill, world_size, args=(argv,), timeout=300, start_method="forkserver"
    )
    assert all(o == out[0] for o in out), "ranks disagree on the loss"
    return out[0]


@pytest.mark.timeout(900)
def test_distill_tp2_resume_and_export(_demo_data, teacher, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from mtnlg.checkpoint import load_full_state, load_into_model
    from mtnlg.model import GPTModel

    hf_dir, save = tmp_path / "hf", tmp_path / "student"
    straight = losses(
        distill_args(_demo_data, teacher, extra=["--save", str(save), "--export-hf", str(hf_dir)]),
        2,
    )
    first = losses(
        distill_args(
            _demo_data, teacher, extra=["--save", str(tmp_path / "b"), "--exit-interval", "3"]
        ),
        2,
    )
    resumed = losses(distill_args(_demo_data, teacher, extra=["--load", str(tmp_path / "b")]), 2)
    assert first == straight[:3]
    assert resumed == straight[3:]

    # The exported folder holds exactly the saved mtnlg student (no teacher tensors).
    cfg, full, _ = load_full_state(save)
    assert cfg.num_layers == 2 and not any(k.startswith("layers.2") for k in full)
    ours = GPTModel(cfg, seed=0).eval()
    load_into_model(ours, full, 1, 0)
    hf = GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.full_logits(ids), rtol=1e-4, atol=1e-4)

    # `make demo`'s last step: transformers generates a short text from the exported student.
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    prompt = tok("ROMEO:", return_tensors="pt")
    out = hf.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0]), str)
