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
from mtnlg.checkpoint.convert import hf_to_mtnlg, mtnlg_to_hf, reshard
from mtnlg.checkpoint.rules import tp_kind
from mtnlg.checkpoint.verify import VerifyError, verify
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


def test_hf_read_logits_and_tokenizer(hf_dir):
    """The HF folder read into the TP=1 model gives transformers' logits (the TP>1 shards run
    at their own degree in test_convert_tp.py)."""
    cfg, full, tok = load_full_state(hf_dir)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    torch.testing.assert_close(
        our_logits(cfg, full, ids), hf_logits(hf_dir, ids), atol=1e-4, rtol=0
    )
    assert tok.tokenize("Hello world") == [39, 695, 78, 995]


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_merge_roundtrip(hf_dir, tp):
    cfg, full, _ = load_full_state(hf_dir)
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
    report = verify("hf-to-mtnlg", str(hf_dir), str(ck))
    assert report.logit_diff < 1e-4 and report.tensor_diff == 0.0
    # weights-only reshard to TP=4 x PP=1 keeps the function
    r = tmp_path / "r41"
    reshard(str(ck), str(r), tp=4, pp=1)
    report = verify("reshard", str(ck), str(r))
    assert report.logit_diff == 0.0 and report.tensor_diff == 0.0


def test_refusals(hf_dir, tmp_path):
    ck = tmp_path / "ck"
    hf_to_mtnlg(str(hf_dir), str(ck), tp=2, pp=2, make_vocab_size_divisible_by=8)
    tagdir = ck / "iter_0000000"
    (tagdir / "mtnlg_manifest.json").unlink()  # the shards' own checks, beneath the manifest's
    with pytest.raises(CheckpointError, match="already exists"):
        hf_to_mtnlg(str(hf_dir), str(ck), tp=1, pp=1)
    with pytest.raises(
        CheckpointError,
        match=r"--num-attention-heads \(4\) is not divisible by --tensor-model-parallel-size \(3\)",
    ):
        hf_to_mtnlg(str(hf_dir), str(tmp_path / "x"), tp=3, pp=1)
    assert not list(tmp_path.glob("x*"))  # nothing half-written left behind
    # truncated shard
    f = tagdir / "layer_01-model_01-model_states.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"layer_01-model_01-model_states\.pt: cannot read"):
        load_full_state(ck)
    f.write_bytes(data)
    # missing and extra shards
    f.rename(tmp_path / "moved.pt")
    with pytest.raises(
        CheckpointError,
        match=r"missing shards for TP=2 PP=2: \[.layer_01-model_01-model_states\.pt.\]",
    ):
        load_full_state(ck)
    (tmp_path / "moved.pt").rename(f)
    (tagdir / "layer_01-model_02-model_states.pt").write_bytes(data)
    with pytest.raises(
        CheckpointError,
        match=r"extra shards not expected at TP=2 PP=2: \[.layer_01-model_02-model_states\.pt.\]",
    ):
        load_full_state(ck)
    (tagdir / "layer_01-model_02-model_states.pt").unlink()
    # unknown keys and shape mismatch inside a shard
    sd = torch.load(f, weights_only=True)
    torch.save({**sd, "attention.rotary": torch.zeros(1)}, f)
    with pytest.raises(
        CheckpointError,
        match=r"layer_01-model_01-model_states\.pt: unknown keys \[.layers\.0\.attention\.rotary.\]",
    ):
        load_full_state(ck)
    sd["mlp.up.weight"] = sd["mlp.up.weight"][:-1]
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"mlp\.up\.weight: shape \(255, 64\) does not match"):
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
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated \(5000 bytes"):
        load_full_state(trunc)


def _hf_variant(hf_dir, folder, change, config=None):
    """A copy of the tiny HF folder with ``change(state)`` applied to its tensors."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    conf = json.loads((hf_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**conf, **(config or {})}))
    state = load_file(hf_dir / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize(
    "change, config, error",
    [
        (
            lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"),
            None,
            r"missing tensor for 'layers\.1\.mlp\.up\.bias'",
        ),
        (
            lambda s: s.update({"transformer.h.2.ln_1.weight": torch.ones(64)}),
            None,
            r"tensors beyond the config: \['layers\.2\.ln_1\.weight'\]",
        ),
        (
            lambda s: s.update({"transformer.h.0.attn.rotary": torch.ones(4)}),
            None,
            r"unknown Hugging Face key 'transformer\.h\.0\.attn\.rotary'",
        ),
        (
            lambda s: s.update({"transformer.wpe.weight": torch.zeros(16, 64)}),
            None,
            r"position_embeddings\.weight: shape \(16, 64\) does not match the config \(32, 64\)",
        ),
        (
            lambda s: s.update({"lm_head.weight": s["transformer.wte.weight"] + 1}),
            None,
            r"lm_head\.weight differs from transformer\.wte\.weight \(untied\)",
        ),
        (lambda s: None, {"tie_word_embeddings": False}, r"tie_word_embeddings=false"),
        (lambda s: None, {"activation_function": "relu"}, r"activation_function='relu'"),
    ],
    ids=["missing", "extra", "unknown", "shape", "untied-head", "untied-config", "activation"],
)
def test_hf_refusals(hf_dir, tmp_path, change, config, error):
    bad = _hf_variant(hf_dir, tmp_path / "bad", change, config)
    with pytest.raises(CheckpointError, match=error):
        hf_to_mtnlg(str(bad), str(tmp_path / "out"), tp=2, pp=1)
    assert not (tmp_path / "out").exists()


def test_cli_verify(hf_dir, tmp_path, capsys):
    from checkpoint_tools.convert_checkpoint import main

    out = tmp_path / "ck"
    argv = ["hf-to-mtnlg", "--input", str(hf_dir), "--output", str(out), "--tp", "2", "--pp", "1"]
    assert main(argv) == 0  # --verify's exit status: test_convert_tp.py, through a subprocess
    assert "wrote" in capsys.readouterr().out
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    for bad, error in [
        (["--verify-tolerance", "1e-3"], "--verify-tolerance needs --verify"),
        (["--verify", "--verify-tolerance", "-1"], "must be >= 0, got -1"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv + bad)
        assert exit_info.value.code == 2 and error in capsys.readouterr().err


def test_verify_names_a_corrupted_shard(hf_dir, tmp_path):
    """q and k of head 0 swapped in TP rank 1's file: the tensor and the logits exceed."""
    from mtnlg.checkpoint.integrity import write_local_manifest

    ck = tmp_path / "ck"
    hf_to_mtnlg(str(hf_dir), str(ck), tp=2, pp=1, make_vocab_size_divisible_by=8)
    f = ck / "iter_0000000" / "mp_rank_01_model_states.pt"
    sd = torch.load(f, weights_only=True)
    qkv = sd["module"]["layers.1.attention.qkv.weight"]  # (3h/tp, h) = [q | k | v] of rank 1
    qkv[:16], qkv[32:48] = qkv[32:48].clone(), qkv[:16].clone()
    torch.save(sd, f)
    # as if the converter had written it so (its manifest then lists these bytes)
    write_local_manifest(f.parent, f.parent.name)
    report = verify("hf-to-mtnlg", str(hf_dir), str(ck), tolerance=float("inf"))
    assert report.tensor_name == "layers.1.attention.qkv.weight"
    assert report.tensor_diff > 0.05 and report.logit_diff > 1e-3
    with pytest.raises(
        VerifyError,
        match=r"tolerance 1\.0e-03: max \|logit difference\| = .*"
        r"\(layers\.1\.attention\.qkv\.weight\)$",
    ):
        verify("hf-to-mtnlg", str(hf_dir), str(ck))
