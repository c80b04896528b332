"""Hugging Face GPT-2 -> mtnlg at TP 2/4 x PP 1/2, checked shard by shard, not merged.

A split and its own inverse merge can be wrong together, so the merged state proves nothing
about the shards. Here every TP rank reads its own files (straight from the DeepSpeed layout,
not through the converter's reader) into ``GPTModel`` at that TP degree on gloo processes; the
gathered logits and the loss must equal ``transformers``'. Each shard's q, k, v and QKV bias
are compared with Hugging Face's ``c_attn`` columns of exactly that rank's heads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtnlg.checkpoint.convert import hf_to_mtnlg
from tests.e2e.conftest import ROOT
from tests.helpers.dist import run_distributed

LAYOUTS = [(2, 1), (2, 2), (4, 1), (4, 2)]  # (tp, pp)
CLI = ROOT / "checkpoint_tools" / "convert_checkpoint.py"


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory) -> dict[tuple[int, int], Path]:
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for tp, pp in LAYOUTS:
        out[(tp, pp)] = root / f"tp{tp}pp{pp}"
        hf_to_mtnlg(str(hf_dir), str(out[(tp, pp)]), tp, pp, make_vocab_size_divisible_by=8)
    return out


@pytest.fixture(scope="module")
def hf_state(hf_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(hf_dir / "model.safetensors")


def read_meta(ckpt: Path) -> tuple[Path, dict]:
    tag_dir = ckpt / (ckpt / "latest").read_text().strip()
    return tag_dir, json.loads((tag_dir / "mtnlg_meta.json").read_text())


def rank_state(ckpt: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """TP rank ``tp_rank``'s ``GPTModel`` state, read from DeepSpeed's file names directly.

    PP=1: ``mp_rank_{tp_rank}_model_states.pt["module"]``; PP>1: one
    ``layer_{idx}-model_{tp_rank}`` file per pipeline layer (0 embedding, 1..L blocks, L+1 norm).
    """
    d, meta = read_meta(ckpt)
    if meta["parallel"]["pp"] == 1:
        return torch.load(d / f"mp_rank_{tp_rank:02d}_model_states.pt", weights_only=True)["module"]
    n_layers = meta["model"]["num_layers"]
    state = {}
    for idx in range(n_layers + 2):
        prefix = {0: "embedding.", n_layers + 1: "final_norm."}.get(idx, f"layers.{idx - 1}.")
        sd = torch.load(
            d / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt", weights_only=True
        )
        state.update({prefix + k: v for k, v in sd.items()})
    return state


def _run_shards(rank, world_size, ckpts, ids, labels):
    """Every checkpoint's TP-rank shards in ``GPTModel`` at its TP degree: (logits, loss, padded
    vocabulary) each."""
    from mtnlg.config import ModelConfig
    from mtnlg.distributed import ParallelDims, Topology
    from mtnlg.model import GPTModel

    topos = {tp: Topology(ParallelDims(world_size=world_size, tp=tp)) for tp in (2, 4)}
    out = []
    for ckpt in ckpts:
        _, meta = read_meta(ckpt)
        topo = topos[meta["parallel"]["tp"]]
        model = GPTModel(ModelConfig.from_dict(meta["model"]), tp_group=topo.tp_group).eval()
        model.load_state_dict(rank_state(ckpt, topo.tp_rank), strict=True)
        padded = model.embedding.word_embeddings.weight.shape[0] * topo.tp
        with torch.no_grad():
            out.append((model.full_logits(ids), float(model(ids, labels)), padded))  # (b, s, V)
    return out


@pytest.mark.timeout(300)
def test_tp_shards_give_hf_logits_and_loss(hf_dir, converted):
    """4 processes; TP=2 runs as two TP groups (DP 2), TP=4 as one."""
    from transformers import AutoModelForCausalLM

    text = torch.randint(0, 5000, (2, 33), generator=torch.Generator().manual_seed(3))
    ids, labels = text[:, :-1], text[:, 1:]  # (2, 32) each
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(ids).logits  # (2, 32, 5000)
    want_loss = float(torch.nn.functional.cross_entropy(want.flatten(0, 1), labels.flatten()))

    ckpts = [converted[layout] for layout in LAYOUTS]
    results = run_distributed(
        _run_shards, 4, args=(ckpts, ids, labels), timeout=280, start_method="forkserver"
    )
    for rank, per_ckpt in enumerate(results):
        for layout, (logits, loss, padded) in zip(LAYOUTS, per_ckpt):
            where = f"TP{layout[0]} PP{layout[1]} rank {rank}"
            assert padded > want.shape[-1], where  # the padding rows exist and are left out
            torch.testing.assert_close(
                logits, want, atol=1e-4, rtol=0, msg=lambda m, where=where: f"{where}: {m}"
            )
            assert loss == pytest.approx(want_loss, abs=1e-5), where


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qkv_shards_hold_their_heads(converted, hf_state, layout):
    """Rank r's fused QKV, unpacked as the model does ([q | k | v] rows, heads of r in order),
    equals HF's c_attn q/k/v columns of heads r*nh/tp .. (r+1)*nh/tp - 1, weight and bias."""
    tp, _ = layout
    meta = read_meta(converted[layout])[1]["model"]
    h, nh = meta["hidden_size"], meta["num_attention_heads"]
    hd, local = h // nh, nh // tp
    for r in range(tp):
        state = rank_state(converted[layout], r)
        for i in range(meta["num_layers"]):
            w_hf = hf_state[f"transformer.h.{i}.attn.c_attn.weight"]  # (h, 3h): Conv1D (in, out)
            b_hf = hf_state[f"transformer.h.{i}.attn.c_attn.bias"]  # (3h,)
            w = state[f"layers.{i}.attention.qkv.weight"]  # (3h/tp, h)
            b = state[f"layers.{i}.attention.qkv.bias"]  # (3h/tp,)
            assert w.shape == (3 * h // tp, h) and b.shape == (3 * h // tp,)
            for part, (w_part, b_part) in enumerate(zip(w.chunk(3), b.chunk(3))):  # q, k, v
                for j in range(local):  # local head j is global head r * local + j
                    cols = slice(
                        part * h + (r * local + j) * hd, part * h + (r * local + j + 1) * hd
                    )
                    rows = slice(j * hd, (j + 1) * hd)
                    where = f"TP{tp} rank {r} layer {i} {'qkv'[part]} head {j}"
                    assert torch.equal(w_part[rows], w_hf[:, cols].t()), where
                    assert torch.equal(b_part[rows], b_hf[cols]), where


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CLI), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )


@pytest.mark.timeout(300)
def test_cli_verify_exit_status(hf_dir, tmp_path):
    """The real CLI: exit 0 within the tolerance, 1 and the worst difference beyond it."""
    base = ["hf-to-mtnlg", "--input", str(hf_dir), "--tp", "2", "--pp", "2", "--verify"]
    ok = _cli(*base, "--output", str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stderr
    assert "verify: max |logit difference|" in ok.stdout
    assert "every tensor identical" in ok.stdout
    # fp32 logits of two implementations differ by ~1e-6: beyond a 1e-12 tolerance
    tight = _cli(*base, "--output", str(tmp_path / "tight"), "--verify-tolerance", "1e-12")
    assert tight.returncode == 1, tight.stdout + tight.stderr
    assert "--verify failed" in tight.stderr
    assert "beyond --verify-tolerance 1.0e-12: max |logit difference|" in tight.stderr
    assert (tmp_path / "tight" / "latest").is_file()  # the output stays for inspection
