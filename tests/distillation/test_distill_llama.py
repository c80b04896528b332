"""distill.py with a Hugging Face Llama teacher (issue 14), demo corpus, tiny vocabulary.

The teacher is a random ``LlamaForCausalLM`` (GQA: 4 query heads, 2 KV groups, untied
``lm_head``) saved with ``save_pretrained`` and read through the converter; its vocabulary is
the demo data's (5,000 tokens). References are ``transformers``' own forward passes.

* online, at TP2: a Llama-style student (the teacher's architecture, one block copied from the
  teacher) trains; the teacher logits the run computed (caught with a PyTorch forward hook on
  the teacher module) equal ``transformers``' logits for the same input ids (1e-4); the
  student exports as a ``LlamaForCausalLM`` folder;
* the teacher pass ``distill.py cache --teacher HF_LLAMA_DIR`` at TP2: the stored top-k ids,
  values and log-sum-exp equal ``transformers``' for the samples the run read;
* the student's architecture: the teacher's by default, a GPT-2 one with a GPT-2
  ``--student-preset``, the model flags on top (no processes).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from tests.e2e import conftest as e2e
from tests.e2e.conftest import TINY_MERGES, TINY_VOCAB
from tests.helpers.dist import run_distributed

_demo_data = e2e.demo_prefix  # the e2e session fixture, registered here as `_demo_data`

VOCAB, SEQ = 5000, 16


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    from transformers import LlamaForCausalLM

    from tests.checkpoint.llama_models import hf_config

    torch.manual_seed(0)
    # GQA 4 heads / 2 KV groups, untied; logits with a real spread, not all near zero
    cfg = hf_config("llama", vocab_size=VOCAB, initializer_range=0.2)
    out = tmp_path_factory.mktemp("llama_teacher")
    LlamaForCausalLM(cfg).save_pretrained(out)
    return str(out)


def _hf_logits(teacher_dir: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits  # (b, s, V)


def _tokenizer_args():
    return ["--vocab-file", str(TINY_VOCAB), "--merge-file", str(TINY_MERGES)]


def _record(kinds: tuple[str, ...]):
    """A global forward hook keeping (input, output) of every module whose class is named in
    ``kinds``; returns (records, handle)."""
    records = []

    def hook(module, inputs, output):
        if type(module).__name__ in kinds:
            records.append((inputs[0].detach().clone(), output.detach().float().clone()))

    return records, torch.nn.modules.module.register_module_forward_hook(hook)


def _distill(rank, world_size, argv):
    from mtnlg.distillation.driver import run

    records, handle = _record(("GPTModel",))  # the teacher (the student is a DistillStudent)
    try:
        progress = run(argv)
    finally:
        handle.remove()
    ids, logits = records[0]
    return [loss for _, loss in progress.losses], ids, logits


def _write_cache(rank, world_size, argv):
    from mtnlg.distillation.cache_write import run

    records, handle = _record(("GPTEmbedding",))  # the ids of each teacher forward, in order
    try:
        result = run(argv)
    finally:
        handle.remove()
    return result, torch.cat([ids for ids, _ in records])


@pytest.mark.timeout(600)
def test_online_llama_teacher_tp2(_demo_data, teacher_dir, tmp_path):
    argv = [
        "--teacher", teacher_dir,
        "--student-num-layers", "1",
        "--student-init", "teacher-layers", "--student-init-layers", "1",
        "--kd-temperature", "2.0", "--kd-alpha", "0.5",
        "--tensor-model-parallel-size", "2",
        "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "2",
        "--train-iters", "3", "--lr", "1e-3", "--seed", "11",
        "--data-path", _demo_data, "--split", "95,5,0", *_tokenizer_args(),
        "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "1", "--no-progress",
        "--save", str(tmp_path / "student"), "--export-hf", str(tmp_path / "student-hf"),
    ]  # fmt: skip
    out = run_distributed(_distill, 2, args=(argv,), timeout=300, start_method="forkserver")
    losses = out[0][0]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert out[1][0] == losses, "ranks disagree on the loss"
    ids = out[0][1]
    assert ids.shape == (2, SEQ) and torch.equal(out[1][1], ids)
    ours = torch.cat([out[0][2], out[1][2]], dim=-1)[..., :VOCAB]  # the two vocabulary shards
    ref = _hf_logits(teacher_dir, ids)
    assert ref.std() > 0.5
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)

    from mtnlg.training import checkpointing

    student = checkpointing.read_meta(str(tmp_path / "student"))["model"]
    assert student["num_layers"] == 1 and student["num_query_groups"] == 2
    assert student["position_embedding_type"] == "rope" and student["swiglu"]
    assert student["normalization"] == "rmsnorm" and student["untie_embeddings_and_output_weights"]
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "student-hf")  # the teacher's family
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert exported.config.num_hidden_layers == 1 and exported.config.num_key_value_heads == 2


@pytest.mark.timeout(600)
def test_cache_pass_llama_teacher_tp2(_demo_data, teacher_dir, tmp_path):
    from mtnlg.distillation.cache import TeacherCache

    k, n = 8, 4
    argv = [
        "--teacher", teacher_dir, "--cache-dir", str(tmp_path / "cache"), "--top-k", str(k),
        "--cache-dtype", "fp32", "--chunk-samples", str(n),
        "--data-path", _demo_data, "--split", "95,5,0", "--seed", "11",
        "--seq-length", str(SEQ), "--global-batch-size", str(n), "--train-iters", "1",
        "--micro-batch-size", "2", "--no-progress", "--tensor-model-parallel-size", "2",
        *_tokenizer_args(),
    ]  # fmt: skip
    out = run_distributed(_write_cache, 2, args=(argv,), timeout=300, start_method="forkserver")
    assert out[0][0]["chunks_written"] == 1
    tokens = out[0][1]
    assert tokens.shape == (n, SEQ) and torch.equal(out[1][1], tokens)
    ids, values, lse = TeacherCache(tmp_path / "cache").get(range(n))
    ref = _hf_logits(teacher_dir, tokens)
    top = ref.topk(k, dim=-1)
    order = top.indices.argsort(dim=-1)  # the cache sorts each token's top-k by id
    assert torch.equal(ids.long(), top.indices.gather(-1, order))
    torch.testing.assert_close(values, top.values.gather(-1, order), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, ref.logsumexp(dim=-1), rtol=1e-4, atol=1e-4)


def _args(**kw) -> argparse.Namespace:
    from mtnlg.distillation.driver import build_distill_parser

    argv = ["--teacher", "T", "--data-path", "D", "--train-iters", "1"]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return build_distill_parser("test").parse_args(argv)


def test_student_architecture():
    from mtnlg.config import ModelConfig
    from mtnlg.distillation.student_init import student_config

    llama = ModelConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=VOCAB,
        ffn_hidden_size=96, position_embedding_type="rope", normalization="rmsnorm",
        swiglu=True, num_query_groups=2, untie_embeddings_and_output_weights=True,
        add_bias_linear=False, extra={"hf_architecture": "LlamaForCausalLM"},
    )  # fmt: skip
    same = student_config(_args(student_num_layers=2), llama)
    assert (same.num_layers, same.ffn_hidden_size, same.kv_groups) == (2, 96, 2)
    assert same.use_rope and same.swiglu and not same.tied and not same.add_bias_linear
    assert same.extra["hf_architecture"] == "LlamaForCausalLM"
    gpt2 = student_config(_args(student_preset="tiny"), llama)
    assert not gpt2.use_rope and not gpt2.swiglu and gpt2.tied and gpt2.add_bias_linear
    assert gpt2.normalization == "layernorm" and gpt2.num_query_groups is None
    assert "hf_architecture" not in gpt2.extra and gpt2.vocab_size == VOCAB
    mqa = student_config(_args(num_query_groups=1, student_num_layers=1), llama)
    assert mqa.kv_groups == 1 and "hf_architecture" not in mqa.extra
    gpt_teacher = ModelConfig(2, 64, 4, seq_length=32, vocab_size=VOCAB)
    up = student_config(_args(student_preset="llama-tiny"), gpt_teacher)
    assert up.use_rope and up.swiglu and up.kv_groups == 2 and up.vocab_size == VOCAB
    with pytest.raises(ValueError, match="--num-query-groups 3"):
        student_config(_args(num_query_groups=3), llama)
