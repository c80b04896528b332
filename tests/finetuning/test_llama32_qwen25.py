"""A Llama-3.2-style model (tied embeddings, GQA, ``llama3`` RoPE scaling) and a Qwen2.5-style
one (tied, QKV bias, rope_theta 1e6) as ``transformers`` saves them: SFT fine-tuning at
TP2 x PP2 from the folder, export to Hugging Face, and the export (``from_pretrained`` alone)
gives the fine-tuned checkpoint's logits at 100 positions (beyond the original context of 32).
Conversion and generation parity of these shapes: tests/checkpoint/test_llama_rope_scaling.py,
test_llama_convert.py (tied Llama, Qwen2 with its bias)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.checkpoint.llama_models import VOCAB, hf_config, write_tokenizer
from tests.finetuning.ft_runs import finetune
from tests.finetuning.test_finetune_sft import PAIRS

STYLES = {
    "llama3.2": ("llama", "LlamaForCausalLM", {
        "tie_word_embeddings": True, "max_position_embeddings": 128,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 32}}),
    "qwen2.5": ("qwen2", "Qwen2ForCausalLM", {
        "tie_word_embeddings": True, "max_position_embeddings": 128,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
}  # fmt: skip


@pytest.mark.timeout(600)
@pytest.mark.parametrize("style", list(STYLES))
def test_finetune_tp2pp2_and_export(style, tmp_path):
    import transformers

    from mtnlg.checkpoint import load_full_state, load_into_model
    from mtnlg.model import GPTModel

    family, cls, over = STYLES[style]
    src = tmp_path / "src"
    torch.manual_seed(0)
    model = getattr(transformers, cls)(hf_config(family, **over))
    model.save_pretrained(src)
    write_tokenizer(src)
    lines = [json.dumps({"prompt": p, "response": r}) for p, r in PAIRS]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    argv = [
        "--task", "sft", "--hf-model", str(src), "--train-data", str(tmp_path / "train.jsonl"),
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--seq-length", "96", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "2", "--lr", "1e-3", "--log-interval", "1", "--no-progress",
        "--save", str(out / "ckpt"), "--export-hf", str(out / "hf"),
    ]  # fmt: skip
    run, _ = finetune(argv, 4, out)
    assert len(run.losses) == 2
    conf = json.loads((out / "hf" / "config.json").read_text())
    assert conf["tie_word_embeddings"] and conf["rope_parameters"] == {**over["rope_parameters"]}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    cfg, full, _ = load_full_state(out / "ckpt")
    ours = GPTModel(cfg).eval()
    load_into_model(ours, full, 1, 0)
    ids = torch.randint(0, 257, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, ours.full_logits(ids)[..., :VOCAB],
                                   atol=1e-4, rtol=0)  # fmt: skip
        assert (hf(ids).logits - model.eval()(ids).logits).abs().max() > 1e-3  # it trained
