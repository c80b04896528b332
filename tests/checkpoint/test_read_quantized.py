"""compressed-tensors quantized folders read by mtnlg, checked against ``transformers``.

Folders are made here with compressed-tensors' own API (not mtnlg's exporter): a W4A16 Llama
(int4, group 128, ``pack-quantized``) and W8A16 OPTs with GPT-2's structure (int8 per channel,
``pack-quantized`` and ``int-quantized``). mtnlg's logits through ``load_full_state`` must equal
``AutoModelForCausalLM.from_pretrained(folder)``'s (1e-4), and each dequantized weight must equal
scale x q with q unpacked by compressed-tensors' ``unpack_from_int32``. Unhandled schemes are
refused by name.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mtnlg.checkpoint import CheckpointError, load_full_state, load_into_model
from mtnlg.checkpoint.hf import HFReader
from mtnlg.checkpoint.quantized import check_config
from tests.checkpoint.llama_models import hf_config, write_tokenizer
from tests.checkpoint.test_hf_opt import opt_config


def quantize_folder(model, out, bits: int, fmt: str) -> None:
    """Round-to-nearest symmetric weights of every Linear but lm_head, saved compressed."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    if bits == 4:
        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                                group_size=128)  # fmt: skip
    else:
        args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                              quantization_status=QuantizationStatus.INITIALIZED)  # fmt: skip
    apply_quantization_config(model, qcfg)
    for m in model.modules():
        if getattr(m, "quantization_scheme", None) is None:
            continue
        w = m.weight.data
        if args.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            g = w.reshape(w.shape[0], -1, args.group_size)
            lo, hi = g.amin(-1), g.amax(-1)
        scale, zp = calculate_qparams(lo, hi, args)
        m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
        m.weight_zero_point.data.copy_(zp.reshape(m.weight_zero_point.shape))
        m.quantization_status = QuantizationStatus.FROZEN
    comp = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    comp.compress_model(model)
    model.save_pretrained(out)
    comp.update_config(out)


def noisy(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple]:
    """name -> (folder, bits, number of quantized layers)."""
    from transformers import LlamaForCausalLM, OPTForCausalLM

    root = tmp_path_factory.mktemp("quantized")
    torch.manual_seed(0)
    llama = noisy(LlamaForCausalLM(hf_config("llama", hidden_size=128, intermediate_size=256)))
    quantize_folder(llama, root / "llama_w4", 4, "pack-quantized")
    write_tokenizer(root / "llama_w4")
    out = {"llama_w4": (root / "llama_w4", 4, 2 * 7)}
    for fmt in ("pack-quantized", "int-quantized"):
        torch.manual_seed(1)
        quantize_folder(noisy(OPTForCausalLM(opt_config())), root / fmt, 8, fmt)
        out[f"opt_w8_{fmt}"] = (root / fmt, 8, 2 * 6)
    return out


@pytest.mark.parametrize("name", ["llama_w4", "opt_w8_pack-quantized", "opt_w8_int-quantized"])
def test_logits_equal_transformers(folders, name, capfd):
    from transformers import AutoModelForCausalLM

    from mtnlg.model import GPTModel

    folder, bits, n = folders[name]
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
    cfg, full, _ = load_full_state(folder)
    how = "group 128" if bits == 4 else "channel"
    assert f"dequantized {n} linear layers (w{bits}a16, {how}) to fp32" in capfd.readouterr().err
    model = GPTModel(cfg).eval()
    load_into_model(model, full, 1, 0)
    with torch.no_grad():
        torch.testing.assert_close(model.full_logits(ids), want.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama_w4", "opt_w8_pack-quantized"])
def test_weights_are_scale_times_q_unpacked_independently(folders, name):
    """One projection, unpacked by compressed-tensors' code from the stored tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    folder, bits, _ = folders[name]
    st = load_file(folder / "model.safetensors")
    base = next(k for k in st if k.endswith("layers.1.self_attn.q_proj.weight_packed"))[:-7]
    shape = torch.Size(st[base + "_shape"].tolist())
    q = unpack_from_int32(st[base + "_packed"], bits, shape).float()
    scale = st[base + "_scale"].float()
    if bits == 4:  # groups of 128 along the input dimension
        want = (q.reshape(shape[0], -1, 128) * scale.unsqueeze(-1)).reshape(shape)
    else:
        want = q * scale
    reader = HFReader(folder)
    assert base not in reader.weight_map  # stored packed only: the dense weight is rebuilt
    torch.testing.assert_close(reader._read(base), want, atol=0, rtol=0)
    if name.startswith("opt"):  # q rows come first in the fused QKV (GQA interleaves Llama's)
        got = reader.get("layers.1.attention.qkv.weight")[: shape[0]]
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def _group(**weights) -> dict:
    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
    w.update(weights)
    return {"targets": ["Linear"], "weights": w, "input_activations": None}


@pytest.mark.parametrize(
    "change,named",
    [
        ({"quant_method": "gptq"}, "quant_method"),
        ({"format": "float-quantized"}, "format"),
        (
            {"config_groups": {"g": {**_group(), "input_activations": {"num_bits": 8}}}},
            "input_activations",
        ),  # fmt: skip
        ({"config_groups": {"g": _group(symmetric=False)}}, "symmetric"),
        ({"config_groups": {"g": _group(type="float", num_bits=8)}}, "type"),
        ({"config_groups": {"g": _group(num_bits=3)}}, "num_bits"),
        ({"config_groups": {"g": _group(strategy="block")}}, "strategy"),
        ({"sparsity_config": {"format": "sparse-24-bitmask"}}, "sparsity_config"),
        ({"kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme"),
    ],
)
def test_unhandled_schemes_refused_by_name(change, named):
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"g": _group()}}  # fmt: skip
    qc.update(change)
    with pytest.raises(CheckpointError, match=named):
        check_config(qc)


def test_refused_folder_names_the_scheme(folders, tmp_path):
    import shutil

    src, _, _ = folders["llama_w4"]
    shutil.copytree(src, tmp_path / "q")
    conf = json.loads((tmp_path / "q" / "config.json").read_text())
    conf["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8,
        "type": "float",
    }
    (tmp_path / "q" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="activation quantization"):
        load_full_state(tmp_path / "q")


@pytest.mark.timeout(300)
def test_evaluate_entry_point_runs_a_quantized_folder(folders, tmp_path):
    """``evaluate.py --load QFOLDER``: the loss equals transformers' on the same windows."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from mtnlg.checkpoint.hf import read_hf_tokenizer
    from mtnlg.evaluation.perplexity import text_windows
    from tests.e2e.conftest import ROOT

    folder = folders["llama_w4"][0]
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler. " * 3)
    out = tmp_path / "ppl.json"
    argv = [sys.executable, str(ROOT / "mtnlg" / "evaluate.py"), "--load", str(folder),
            "--task", "perplexity", "--text-file", str(text), "--seq-length", "16",
            "--micro-batch-size", "4", "--no-progress", "--output-json", str(out)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ,
                          "DS_ACCELERATOR": "cpu"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dequantized 14 linear layers (w4a16, group 128) to fp32" in proc.stderr
    ids = read_hf_tokenizer(folder).tokenize(text.read_text())
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in text_windows(ids, 16):
            w = torch.from_numpy(w)[None]
            logp = model(w[:, :-1]).logits.float().log_softmax(-1)
            nll -= logp.gather(-1, w[:, 1:, None]).sum().item()
            n += w.shape[1] - 1
    assert json.loads(out.read_text())["loss"] == pytest.approx(nll / n, abs=1e-4)
