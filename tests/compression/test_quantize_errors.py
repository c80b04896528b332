"""Bad input to ``convert_checkpoint.py quantize``: a clear error naming the thing, exit status
2, and nothing written (no DST, no DST.tmp-*, no scratch folder)."""

from __future__ import annotations

import json
import shutil

import pytest

from checkpoint_tools.convert_checkpoint import main
from tests.compression import quantize_helpers as h


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> dict:
    from mtnlg.checkpoint.convert import hf_to_mtnlg

    d = tmp_path_factory.mktemp("quant_err")
    h.make_llama_family(d / "llama", "llama")
    h.make_gpt2(d / "gpt2")
    hf_to_mtnlg(str(d / "gpt2"), str(d / "gpt2_tp1"), 1, 1, make_vocab_size_divisible_by=8)
    return {"dir": d, "llama": d / "llama", "calib": h.write_calib(d / "calib.txt", 20)}


def _refused(capsys, tmp_path, argv: list[str], *needles: str) -> str:
    out = tmp_path / "out"
    rc = main(["quantize", "--save", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    for n in needles:
        assert n in err, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "keep") == [], "left behind"
    return err


def test_unknown_scheme(src, capsys, tmp_path):
    _refused(capsys, tmp_path, ["--load", str(src["llama"]), "--scheme", "w3a16"], "w3a16", "w8a16")


def test_group_size_not_dividing_names_the_layer(src, capsys, tmp_path):
    argv = ["--load", str(src["llama"]), "--scheme", "w4a16-rtn", "--group-size", "96"]
    _refused(capsys, tmp_path, argv, "--group-size 96", "model.layers.0.self_attn.q_proj", "in 256")


def test_classifier_heads_are_refused(src, capsys, tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    hf = src["dir"] / "cls_hf"
    if not hf.exists():
        conf = GPT2Config(vocab_size=64, n_positions=32, n_embd=256, n_layer=1, n_head=4)
        GPT2ForSequenceClassification(conf).save_pretrained(hf)
    argv = ["--load", str(hf), "--scheme", "w8a16"]
    _refused(capsys, tmp_path, argv, "classifier head", "GPT2ForSequenceClassification")
    # an mtnlg classification checkpoint (finetune.py --task classification) is refused too
    ckpt = src["dir"] / "cls_ckpt"
    if not ckpt.exists():
        shutil.copytree(src["dir"] / "gpt2_tp1", ckpt)
        meta = next(ckpt.glob("*/mtnlg_meta.json"))
        m = json.loads(meta.read_text())
        meta.write_text(json.dumps({**m, "classification": {"num_labels": 2}}))
    _refused(capsys, tmp_path, ["--load", str(ckpt), "--scheme", "w8a16"], "classifier head")


def test_too_few_calibration_tokens(src, capsys, tmp_path):
    argv = ["--load", str(src["llama"]), "--scheme", "w4a16", "--calib-data", str(src["calib"])]
    argv += ["--calib-samples", "5000", "--calib-seq-length", "32"]
    _refused(
        capsys, tmp_path, argv, f"--calib-data {src['calib']}", "--calib-samples 5000", "160000"
    )


def test_gptq_needs_calibration_data(src, capsys, tmp_path):
    _refused(capsys, tmp_path, ["--load", str(src["llama"]), "--scheme", "w4a16"], "--calib-data")


def test_existing_destination_is_kept(src, capsys, tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    rc = main(["quantize", "--load", str(src["llama"]), "--save", str(keep), "--scheme", "w8a16"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert list(keep.iterdir()) == []


def test_failure_midway_leaves_nothing(src, tmp_path, monkeypatch):
    from mtnlg.compression import quantize as q

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(q, "apply_rtn", boom)
    with pytest.raises(RuntimeError, match="boom"):
        q.quantize(str(src["dir"] / "gpt2_tp1"), str(tmp_path / "out"), "w8a16")
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_folder(src, capsys, tmp_path):
    rc = main(["quantize", "--load", str(src["llama"]), "--save", str(tmp_path / "out"),
               "--scheme", "w4a16-rtn", "--dtype", "bf16"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["dtype"] == "bfloat16" and "bfloat16" in config["mtnlg"]["not_quantized"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    st = load_file(tmp_path / "out" / "model.safetensors")
    scale = st["model.layers.0.mlp.down_proj.weight_scale"]
    assert scale.dtype == torch.bfloat16 and scale.shape == (256, 512 // 128)
    assert st["model.embed_tokens.weight"].dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(h.ids(300)).logits.float()).all()
