"""Quantized exports (``convert_checkpoint.py quantize``): the folder is read as we meant it.

For each scheme (w8a16, w4a16-rtn, w4a16 = GPTQ) and family (GPT-2 from a TP2 x PP2 mtnlg
checkpoint, written as its OPT carrier; Llama with GQA; Qwen2 with QKV bias, untied head):
``AutoModelForCausalLM.from_pretrained(dir)`` alone loads it, and its logits equal (1e-4) those
of the unquantized export whose quantized weights are replaced by scale x q, computed here from
the stored integers. Also: the carrier's fp32 logits equal GPT-2's; a TP2 x PP2 checkpoint and
its TP1 merge give byte-identical folders; lm-eval's ``hf`` model runs the folder.
"""

from __future__ import annotations

import os

import pytest
import torch

from mtnlg.checkpoint.convert import hf_to_mtnlg, mtnlg_to_hf
from mtnlg.compression.opt_export import gpt2_to_opt
from mtnlg.compression.quantize import quantize
from tests.compression import quantize_helpers as h

SCHEMES = ["w8a16", "w4a16-rtn", "w4a16"]
FAMILIES = ["gpt2", "llama", "qwen2"]
LINEARS_PER_BLOCK = {"gpt2": 6, "llama": 7, "qwen2": 7}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("quant")
    torch.set_num_threads(2)
    h.make_gpt2(d / "gpt2_hf")
    hf_to_mtnlg(str(d / "gpt2_hf"), str(d / "gpt2_tp1"), 1, 1, make_vocab_size_divisible_by=8)
    hf_to_mtnlg(str(d / "gpt2_hf"), str(d / "gpt2_tp2pp2"), 2, 2, make_vocab_size_divisible_by=8)
    mtnlg_to_hf(str(d / "gpt2_tp2pp2"), str(d / "gpt2_export"))  # GPT2LMHeadModel, fp32
    gpt2_to_opt(d / "gpt2_export", d / "gpt2_carrier")
    for fam in ("llama", "qwen2"):
        h.make_llama_family(d / f"{fam}_hf", fam)
    return {
        "dir": d,
        "calib": h.write_calib(d / "calib.txt"),
        "source": {"gpt2": d / "gpt2_tp2pp2", "llama": d / "llama_hf", "qwen2": d / "qwen2_hf"},
        "ref": {"gpt2": d / "gpt2_carrier", "llama": d / "llama_hf", "qwen2": d / "qwen2_hf"},
        "done": {},
    }


def quantized(models: dict, family: str, scheme: str, source: str | None = None):
    """The folder of (family, scheme), quantized once per module; its report."""
    key = (family, scheme, source)
    if key not in models["done"]:
        out = models["dir"] / f"q_{family}_{scheme}_{source or 'main'}"
        src = source or models["source"][family]
        report = quantize(
            str(src), str(out), scheme, calib_data=str(models["calib"]),
            calib_samples=h.SAMPLES, calib_seq_length=h.SEQ,
        )  # fmt: skip
        models["done"][key] = (out, report)
    return models["done"][key]


def test_opt_carrier_equals_gpt2(models):
    from transformers import AutoModelForCausalLM

    d = models["dir"]
    gpt2 = AutoModelForCausalLM.from_pretrained(d / "gpt2_export").eval()
    opt = AutoModelForCausalLM.from_pretrained(d / "gpt2_carrier").eval()
    assert type(opt).__name__ == "OPTForCausalLM"
    x = h.ids(gpt2.config.vocab_size)
    mask = torch.ones_like(x)
    mask[1, 17:] = 0  # right padding: the real positions agree
    with torch.no_grad():
        torch.testing.assert_close(opt(x).logits, gpt2(x).logits, atol=1e-5, rtol=0)
        a, b = opt(x, attention_mask=mask).logits, gpt2(x, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_logits_equal_scale_times_q(models, family, scheme):
    from transformers import AutoModelForCausalLM

    out, report = quantized(models, family, scheme)
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # nothing else
    ref, deq = h.dequantized_reference(models["ref"][family], out)
    n_blocks = ref.config.num_hidden_layers
    assert len(deq) == report["linears"] == LINEARS_PER_BLOCK[family] * n_blocks
    assert not any("lm_head" in k or "embed" in k for k in deq)
    x = h.ids(ref.config.vocab_size)
    with torch.no_grad():
        got, want = model(x).logits, ref(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    _, ints, config = h.read_quantized(out)
    bits = 8 if scheme == "w8a16" else 4
    assert config["mtnlg"]["scheme"] == scheme
    assert "lm_head" in config["quantization_config"]["ignore"]
    if family == "gpt2":
        assert config["architectures"] == ["OPTForCausalLM"]
        assert config["mtnlg"]["exported_from"] == "gpt2"
    fp = AutoModelForCausalLM.from_pretrained(models["ref"][family]).state_dict()
    for name, (q, step) in ints.items():
        assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1, name
        if scheme != "w4a16":  # round-to-nearest: each weight within half a step of scale x q
            err = (deq[name].double() - fp[name].double()).abs()
            assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all(), name


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_tp2pp2_and_tp1_merge_give_the_same_bytes(models, scheme):
    a, _ = quantized(models, "gpt2", scheme)
    b, _ = quantized(models, "gpt2", scheme, source=str(models["dir"] / "gpt2_tp1"))
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_lm_eval_hf_model_runs_the_folder(models, tmp_path):
    import math

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tests.e2e.conftest import ROOT

    out, _ = quantized(models, "gpt2", "w4a16")
    os.environ.update(
        {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path)}
    )
    cwd = os.getcwd()
    os.chdir(ROOT)  # the task's data_files is relative to the repository root
    try:
        lm = HFLM(pretrained=str(out), device="cpu", batch_size=2)
        tasks = TaskManager(include_path=str(ROOT / "mtnlg/evaluation/harness_tasks"))
        res = lm_eval.simple_evaluate(
            model=lm, tasks=["lambada_local"], task_manager=tasks, limit=4, bootstrap_iters=0
        )
    finally:
        os.chdir(cwd)
    assert type(lm.model).__name__ == "OPTForCausalLM"
    metrics = res["results"]["lambada_local"]
    assert math.isfinite(metrics["perplexity,none"]) and 0 <= metrics["acc,none"] <= 1


def test_gptq_beats_round_to_nearest_on_calibration_data(models):
    """Per linear, ||X (W_q - W)^T|| on the calibration rows' inputs X (the fp32 model's):
    GPTQ minimises exactly this (given its inputs), RTN ignores X; GPTQ must be lower."""
    from transformers import AutoModelForCausalLM

    from mtnlg.compression.quantize import Source, calibration_rows

    src = Source(str(models["source"]["gpt2"]))
    rows = calibration_rows(src, str(models["calib"]), h.SAMPLES, h.SEQ)
    fp = AutoModelForCausalLM.from_pretrained(models["ref"]["gpt2"]).eval()
    inputs = {}

    def keep(name):
        def hook(mod, args, out):
            inputs[name] = args[0].reshape(-1, args[0].shape[-1])  # (tokens, in)

        return hook

    for name, m in fp.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_hook(keep(name + ".weight"))
    with torch.no_grad():
        fp(torch.tensor(rows))
    weights = fp.state_dict()
    err = {}
    for scheme in ("w4a16", "w4a16-rtn"):
        deq, _, _ = h.read_quantized(quantized(models, "gpt2", scheme)[0])
        err[scheme] = {n: float((inputs[n] @ (deq[n] - weights[n]).T).norm()) for n in sorted(deq)}
    wins = [n for n in err["w4a16"] if err["w4a16"][n] < err["w4a16-rtn"][n]]
    assert len(wins) == len(err["w4a16"]), (err, wins)
    assert sum(err["w4a16"].values()) < 0.9 * sum(err["w4a16-rtn"].values()), err


def test_exported_gpt2_folder_gives_the_checkpoints_bytes(models):
    """The HF folder mtnlg exported quantizes to the same files as the checkpoint it came from."""
    a, _ = quantized(models, "gpt2", "w8a16")
    b, _ = quantized(models, "gpt2", "w8a16", source=str(models["dir"] / "gpt2_export"))
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
