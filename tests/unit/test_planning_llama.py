"""The planner's parameter and FLOP counts for the Llama-style options (issue 14).

References, all independent of ``mtnlg.planning``: ``transformers``' own models built from the
same shapes (``LlamaForCausalLM`` / ``Qwen2ForCausalLM``), ``sum(p.numel())`` of a built
``GPTModel`` (TP1 in-process; per rank at TP2 and per stage of ``GPTPipe`` at PP2 in two
processes, KV groups split and shared over the TP ranks), and the PaLM FLOP formula
(Chowdhery et al. 2022, app. B: 6N + 12 L H Q T per token) written out here with N counted from
the ``nn.Linear`` weights of the transformers model.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mtnlg.config import ModelConfig
from mtnlg.distributed.topology import ParallelConfigError
from mtnlg.plan import main
from mtnlg.planning import (
    Layout,
    activation_bytes_per_layer,
    forward_flops_per_token,
    iteration_flops,
    make_plan,
    model_activation_bytes_per_layer,
    stage_params,
)
from tests.helpers.dist import run_distributed

V = 256  # a multiple of 128: padded == true vocabulary at TP 1 and 2

# name: (ModelConfig overrides, HF class name, HF config overrides)
LLAMA = dict(
    position_embedding_type="rope",
    normalization="rmsnorm",
    swiglu=True,
    add_bias_linear=False,
    untie_embeddings_and_output_weights=True,
)
CASES = {
    "llama-gqa": ({**LLAMA, "num_query_groups": 2}, "LlamaForCausalLM", {}),
    "llama-mqa": ({**LLAMA, "num_query_groups": 1}, "LlamaForCausalLM", {}),
    "llama-mha-tied": (
        {**LLAMA, "untie_embeddings_and_output_weights": False},
        "LlamaForCausalLM",
        {"tie_word_embeddings": True},
    ),
    "qwen2-qkv-bias": (
        {**LLAMA, "num_query_groups": 2, "add_qkv_bias": True},
        "Qwen2ForCausalLM",
        {},
    ),
}


def _cfg(overrides: dict, **kw) -> ModelConfig:
    base = dict(
        num_layers=3,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=96,
        seq_length=32,
        vocab_size=V,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return ModelConfig(**(base | overrides | kw))


def _hf_model(cfg: ModelConfig, cls_name: str, hf_over: dict):
    import transformers

    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    hf_cfg = config_cls(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_groups,
        max_position_embeddings=cfg.seq_length,
        **({"tie_word_embeddings": False} | hf_over),
    )
    return getattr(transformers, cls_name)(hf_cfg)


@pytest.fixture(scope="module")
def hf_models():
    torch.manual_seed(0)
    return {k: (_cfg(o), _hf_model(_cfg(o), c, h)) for k, (o, c, h) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_params_equal_transformers(hf_models, case):
    cfg, hf = hf_models[case]
    expected = hf.num_parameters()
    assert expected == sum(p.numel() for p in hf.parameters())
    assert cfg.num_parameters() == expected
    (stage,) = stage_params(cfg, tp=1, pp=1)
    assert stage.params_unique == expected == stage.params_per_rank
    assert stage.has_embedding and stage.has_output_layer == (not cfg.tied)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 3)])
def test_stages_sum_to_model(hf_models, case, tp, pp):
    cfg, _ = hf_models[case]
    stages = stage_params(cfg, tp, pp)
    duplicate = cfg.padded_vocab_size(tp) * cfg.hidden_size if cfg.tied else 0
    assert sum(s.params_unique for s in stages) == cfg.num_parameters(padded_tp=tp) + duplicate
    assert stages[-1].has_output_layer == (not cfg.tied) and not stages[0].has_output_layer
    assert stages[-1].has_embedding == cfg.tied and stages[0].has_embedding


@pytest.mark.parametrize("case", list(CASES))
def test_flops_per_token_palm_formula(hf_models, case):
    cfg, hf = hf_models[case]
    # N: every matmul weight, the output projection (lm_head) included, tied or not
    n = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))
    L, H, Q, T = cfg.num_layers, cfg.num_attention_heads, cfg.head_dim, cfg.seq_length
    palm = 6 * n + 12 * L * H * Q * T
    assert 3 * forward_flops_per_token(cfg) == pytest.approx(palm, rel=1e-12)
    assert iteration_flops(cfg, 8, recompute=False) == pytest.approx(8 * T * palm, rel=1e-12)
    lm_head = 2 * cfg.hidden_size * cfg.padded_vocab_size()  # forward FLOPs, not recomputed
    recomputed = 8 * T * (palm * 4 / 3 - lm_head)
    assert iteration_flops(cfg, 8, recompute=True) == pytest.approx(recomputed, rel=1e-12)


def test_gpt2_activation_formula_unchanged():
    cfg = ModelConfig(num_layers=2, hidden_size=768, num_attention_heads=12, seq_length=1024)
    s, b, h, a = 1024, 4, 768, 12
    for t in (1, 2, 4):
        korthikanti = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
        assert model_activation_bytes_per_layer(cfg, b, t) == pytest.approx(korthikanti)


def test_llama_activation_terms():
    cfg = _cfg({**LLAMA, "num_query_groups": 2})
    s, b, h, a, d, f = 32, 2, 64, 4, 16, 96
    for t, kv_local in ((1, 2 * d), (2, d), (4, d)):  # at t=4 each rank gathers one whole group
        replicated = 4 * s * b * h + 4 * s * b * h + 2 * s * b * h  # norms, QKV/MLP in, masks
        q_and_dense_in = (2 * s * b * h + 2 * s * b * h) / t
        k_and_v = 2 * 2 * s * b * kv_local
        swiglu = 4 * 2 * s * b * f / t  # gate, up, silu(gate), product
        scores = 5 * a * s * s * b / t
        expected = replicated + q_and_dense_in + k_and_v + swiglu + scores
        assert model_activation_bytes_per_layer(cfg, b, t) == pytest.approx(expected)
    gelu = activation_bytes_per_layer(s, b, h, a, 1, ffn=f)
    swiglu = activation_bytes_per_layer(s, b, h, a, 1, ffn=f, swiglu=True)
    assert swiglu - gelu == pytest.approx(4 * s * b * f)


def test_gqa_tp_rule_and_cli(capsys):
    cfg = _cfg({**LLAMA, "num_query_groups": 2}, num_attention_heads=8, hidden_size=64)
    lay = dict(pp=1, dp=1, micro_batch_size=1, global_batch_size=1)
    for tp in (1, 2, 4, 8):  # groups split (tp | 2) or shared by tp/2 ranks (2 | tp)
        make_plan(cfg, Layout(tp=tp, **lay))
    bad = dataclasses.replace(cfg, num_query_groups=4, num_attention_heads=12, hidden_size=96)
    with pytest.raises(ParallelConfigError, match="--num-query-groups"):
        make_plan(bad, Layout(tp=3, **lay))
    argv = ["--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4"]
    argv += ["--seq-length", "32", "--vocab-size", str(V), "--ffn-hidden-size", "96"]
    argv += ["--num-query-groups", "2", "--position-embedding-type", "rope"]
    argv += ["--normalization", "rmsnorm", "--swiglu", "--disable-bias-linear"]
    argv += ["--untie-embeddings-and-output-weights", "--data-parallel-size", "1"]
    argv += ["--micro-batch-size", "1", "--global-batch-size", "1", "--json"]
    main(argv)
    d = json.loads(capsys.readouterr().out)
    assert d["num_parameters"] == _cfg({**LLAMA, "num_query_groups": 2}).num_parameters()
    assert d["stages"][0]["has_output_layer"]


# --- against built models ----------------------------------------------------------------------

BUILT = {  # vocabulary 300: padded to 384 at TP1, 512 at TP2 (the padding rows are counted)
    **{k: o for k, (o, _, _) in CASES.items()},
    "gpt2": {},
    "llama-mha-bias": {**LLAMA, "add_bias_linear": True},
}


def _built_cfg(name: str) -> ModelConfig:
    return _cfg(BUILT[name], vocab_size=300)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list(BUILT))
def test_params_equal_built_model_tp1(name):
    from mtnlg.model import GPTModel

    cfg = _built_cfg(name)
    built = _numel(GPTModel(cfg))
    (stage,) = stage_params(cfg, 1, 1)
    assert built == stage.params_unique == stage.params_per_rank
    assert built == cfg.num_parameters(padded_tp=1)


def _built_counts(rank, world_size, names):
    from mtnlg.distributed import ParallelDims, Topology
    from mtnlg.model import GPTModel
    from mtnlg.model.pipe import GPTPipe

    tp2 = Topology(ParallelDims(world_size=2, tp=2, pp=1))
    pp2 = Topology(ParallelDims(world_size=2, tp=1, pp=2))
    out = {}
    for name in names:
        cfg = _built_cfg(name)
        out[name] = (_numel(GPTModel(cfg, tp_group=tp2.tp_group)), _numel(GPTPipe(cfg, pp2)))
    return out


@pytest.mark.timeout(300)
def test_params_per_rank_and_stage_equal_built_tp2_pp2():
    names = list(BUILT)
    counts = run_distributed(
        _built_counts, 2, args=(names,), timeout=240, start_method="forkserver"
    )
    for name in names:
        cfg = _built_cfg(name)
        tp_rank = stage_params(cfg, tp=2, pp=1)[0].params_per_rank
        stages = stage_params(cfg, tp=1, pp=2)
        for rank in (0, 1):
            assert counts[rank][name][0] == tp_rank, (name, rank)
            assert counts[rank][name][1] == stages[rank].params_per_rank, (name, rank)


@pytest.mark.parametrize(
    "preset,cls_name",
    [
        ("llama2-7b", "LlamaForCausalLM"),
        ("llama2-70b", "LlamaForCausalLM"),
        ("llama3-8b", "LlamaForCausalLM"),
        ("mistral-7b", "MistralForCausalLM"),
        ("qwen2-0.5b", "Qwen2ForCausalLM"),
        ("llama3.1-8b", "LlamaForCausalLM"),
        ("llama3.2-1b", "LlamaForCausalLM"),
        ("llama3.2-3b", "LlamaForCausalLM"),
        ("qwen2.5-0.5b", "Qwen2ForCausalLM"),
        ("qwen2.5-7b", "Qwen2ForCausalLM"),
    ],
)
def test_released_sizes_equal_transformers_on_meta(preset, cls_name):
    """The planner at the released models' shapes (their vocabularies need no padding) against
    ``transformers`` built on the meta device (no memory)."""
    from mtnlg.presets import get_preset

    cfg = get_preset(preset)
    with torch.device("meta"):
        hf = _hf_model(cfg, cls_name, {"tie_word_embeddings": cfg.tied})
    (stage,) = stage_params(cfg, tp=1, pp=1)
    assert stage.params_unique == hf.num_parameters()
    n = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))
    L, h, s = cfg.num_layers, cfg.hidden_size, cfg.seq_length
    assert 3 * forward_flops_per_token(cfg) == pytest.approx(6 * n + 12 * L * h * s, rel=1e-12)
