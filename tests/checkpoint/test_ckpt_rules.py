"""Pure conversion rules and single-process conversions, checked against ``transformers``."""

from __future__ import annotations

import json

import pytest
import torch

from mtnlg.checkpoint import (
    CheckpointError,
    export_hf,
    load_full_state,
    load_into_model,
    merge_state,
    shard_state,
)
from mtnlg.checkpoint.convert import hf_to_mtnlg, mtnlg_to_hf, reshard, verify
from mtnlg.checkpoint.rules import tp_kind
from mtnlg.model import GPTModel


def hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


def our_logits(cfg, full, ids):
    model = GPTModel(cfg).eval()
    load_into_model(model, full, 1, 0)
    return model.full_logits(ids)


def test_tp_table_and_qkv_stride():
    assert tp_kind("layers.3.attention.qkv.weight") == "column_qkv"
    assert tp_kind("layers.0.attention.dense.bias") == "replicated"
    assert tp_kind("embedding.word_embeddings.weight") == "vocab"
    with pytest.raises(CheckpointError, match="unknown parameter"):
        tp_kind("layers.0.attention.rotary.inv_freq")


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_merge_roundtrip_and_logits(hf_dir, tp):
    cfg, full, tok = load_full_state(hf_dir)
    cfg.make_vocab_size_divisible_by = 8
    shards = [shard_state(full, cfg, tp, r) for r in range(tp)]
    assert shards[0]["embedding.word_embeddings.weight"].shape[0] == cfg.padded_vocab_size(tp) // tp
    # rank r's QKV holds [q_r | k_r | v_r]
    h, q = cfg.hidden_size, full["layers.0.attention.qkv.weight"]
    local = shards[1]["layers.0.attention.qkv.weight"]
    assert torch.equal(local[: h // tp], q[h // tp : 2 * h // tp])
    assert torch.equal(local[h // tp : 2 * h // tp], q[h + h // tp : h + 2 * h // tp])
    back = merge_state(shards, cfg)
    assert all(torch.equal(back[k], full[k]) for k in full)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    torch.testing.assert_close(
        our_logits(cfg, full, ids), hf_logits(hf_dir, ids), atol=1e-4, rtol=0
    )
    assert tok.tokenize("Hello world") == [39, 695, 78, 995]


def test_export_hf_roundtrip_sharded(hf_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg, full, tok = load_full_state(hf_dir)
    out = tmp_path / "exp"
    export_hf(cfg, full, tok, out, max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.testing.assert_close(hf_logits(out, ids), hf_logits(hf_dir, ids), atol=0, rtol=0)
    assert AutoTokenizer.from_pretrained(out)("Hello world").input_ids == [39, 695, 78, 995]
    orig = load_file(hf_dir / "model.safetensors")
    cfg2, full2, _ = load_full_state(out)
    assert all(torch.equal(full2[k], full[k]) for k in full)
    assert "transformer.wte.weight" in orig


def test_hf_to_mtnlg_tp2_pp2_and_back_identical(hf_dir, tmp_path):
    from safetensors.torch import load_file

    ck = tmp_path / "ck"
    hf_to_mtnlg(str(hf_dir), str(ck), tp=2, pp=2, make_vocab_size_divisible_by=8)
    meta = json.loads((ck / "iter_0000000" / "mtnlg_meta.json").read_text())
    assert meta["parallel"] == {"tp": 2, "pp": 2, "dp": 1} and meta["weights_only"]
    back = tmp_path / "back"
    mtnlg_to_hf(str(ck), str(back))
    a, b = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    a = {k: v for k, v in a.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    a.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert verify("hf-to-mtnlg", str(hf_dir), str(ck)) < 1e-4
    # weights-only reshard to TP=4 x PP=1 keeps the function
    r = tmp_path / "r41"
    reshard(str(ck), str(r), tp=4, pp=1)
    assert verify("reshard", str(ck), str(r)) == 0.0


def test_refusals(hf_dir, tmp_path):
    ck = tmp_path / "ck"
    hf_to_mtnlg(str(hf_dir), str(ck), tp=2, pp=2, make_vocab_size_divisible_by=8)
    tagdir = ck / "iter_0000000"
    with pytest.raises(CheckpointError, match="already exists"):
        hf_to_mtnlg(str(hf_dir), str(ck), tp=1, pp=1)
    with pytest.raises(CheckpointError, match="not divisible|divisible"):
        hf_to_mtnlg(str(hf_dir), str(tmp_path / "x"), tp=3, pp=1)
    assert not list(tmp_path.glob("x*"))  # nothing half-written left behind
    # truncated shard
    f = tagdir / "layer_01-model_01-model_states.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_full_state(ck)
    f.write_bytes(data)
    # missing and extra shards
    f.rename(tmp_path / "moved.pt")
    with pytest.raises(CheckpointError, match="missing shards"):
        load_full_state(ck)
    (tmp_path / "moved.pt").rename(f)
    (tagdir / "layer_01-model_02-model_states.pt").write_bytes(data)
    with pytest.raises(CheckpointError, match="extra shards"):
        load_full_state(ck)
    (tagdir / "layer_01-model_02-model_states.pt").unlink()
    # unknown keys and shape mismatch inside a shard
    sd = torch.load(f, weights_only=True)
    torch.save({**sd, "attention.rotary": torch.zeros(1)}, f)
    with pytest.raises(CheckpointError, match="unknown keys"):
        load_full_state(ck)
    sd["mlp.up.weight"] = sd["mlp.up.weight"][:-1]
    torch.save(sd, f)
    with pytest.raises((CheckpointError, ValueError)):
        load_full_state(ck)
    # unsupported architecture / truncated safetensors
    bad = tmp_path / "neox"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    (bad / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="unsupported Hugging Face architecture"):
        load_full_state(bad)
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_text((hf_dir / "config.json").read_text())
    (trunc / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(CheckpointError):
        load_full_state(trunc)


def test_cli_verify(hf_dir, tmp_path, capsys):
    from checkpoint_tools.convert_checkpoint import main

    out = tmp_path / "ck"
    argv = ["hf-to-mtnlg", "--input", str(hf_dir), "--output", str(out), "--tp", "2", "--pp", "1"]
    assert main(argv + ["--verify"]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
