"""RoPE scaling (linear, dynamic, llama3, yarn) against ``transformers`` 5, at positions past the
pretraining context: tiny random Llama / Qwen2 folders (``llama_models``: GQA 4 heads / 2 KV
groups, head dim 8) with original context 32 and max_position_embeddings 128 (dynamic: 64, the
length past which transformers rescales it), evaluated on 128 tokens.

* logits at TP1 (the converted checkpoint and the HF folder read directly), TP2 and TP2 x PP2
  (each TP rank from its own files; the PP2 stages run one after the other) = transformers'
  forward (1e-4, fp32);
* greedy generation (KV cache, left-padded batch reaching past position 32) at TP1 and at
  TP2 x PP2 on 4 ranks = transformers' ``generate``, each step's logits = its forward;
* ``hf-to-mtnlg`` then ``mtnlg-to-hf``: the very tensors, and a config that transformers reads
  back to the same ``rope_parameters``; legacy ``rope_scaling`` files read the same way;
* ``ModelConfig`` round trip, the training flags, and what stays refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtnlg.checkpoint import CheckpointError, load_full_state, load_into_model
from mtnlg.checkpoint.convert import hf_to_mtnlg, mtnlg_to_hf
from mtnlg.checkpoint.hf_llama import config_from_hf
from mtnlg.config import ModelConfig
from tests.checkpoint.llama_models import VOCAB, hf_config, write_tokenizer
from tests.helpers.dist import run_distributed

EOS = 256
ORIGINAL = 32
LENGTH = 128  # tokens of the logits input (positions 0..127)
# name -> (family, max_position_embeddings, rope_parameters less rope_theta)
CASES = {
    "linear": ("llama", 128, {"rope_type": "linear", "factor": 4.0}),
    "dynamic": ("llama", 64, {"rope_type": "dynamic", "factor": 4.0}),
    "llama3": (
        "llama",
        128,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "original_max_position_embeddings": ORIGINAL,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
    ),
    "yarn": (  # Qwen2.5's form; attention factor 0.1 ln 4 + 1 applied to cos/sin
        "qwen2",
        128,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    ),
    "yarn-betas": (
        "llama",
        128,
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "attention_factor": 1.25,
        },
    ),
}
# generation: prompts of 40 and 23 tokens + 24 new ones (positions up to 63 > 32)
PROMPTS = [[(7 * i + 3) % 250 for i in range(40)], [(11 * i + 5) % 250 for i in range(23)]]
NEW_TOKENS = 24


def make_hf(folder: Path, name: str, seed: int):
    import transformers

    family, max_pos, rope = CASES[name]
    conf = hf_config(
        family,
        max_position_embeddings=max_pos,
        rope_parameters={**rope, "rope_theta": 5000.0},
    )
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(conf)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # sharp logits: clear greedy margins
    model.eval()
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(3))


def hf_batch_greedy(model) -> list[list[int]]:
    n = max(map(len, PROMPTS))
    ids = torch.full((len(PROMPTS), n), EOS, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, n - len(p) :], mask[i, n - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=EOS, eos_token_id=EOS,
        )  # fmt: skip
    rows = out[:, n:].tolist()
    return [r[: r.index(EOS) + 1] if EOS in r else r for r in rows]


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine has two cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, one_thread) -> dict:
    """name -> (HF folder, TP1 / TP2 / TP2xPP2 checkpoints, HF logits, HF greedy tokens)."""
    root = tmp_path_factory.mktemp("rope_scaling")
    out = {}
    for i, name in enumerate(CASES):
        folder = root / name
        model = make_hf(folder, name, seed=10 + i)
        ckpts = {}
        for tp, pp in ((1, 1), (2, 1), (2, 2)):
            ckpts[(tp, pp)] = root / f"{name}-tp{tp}pp{pp}"
            hf_to_mtnlg(str(folder), str(ckpts[(tp, pp)]), tp, pp, make_vocab_size_divisible_by=8)
        with torch.no_grad():
            logits = model(_ids()).logits
        out[name] = (folder, ckpts, logits, hf_batch_greedy(model), model)
    return out


@pytest.mark.timeout(300)
def test_tp1_logits_equal_transformers_past_original_context(cases):
    from mtnlg.inference.stage import load_stage
    from mtnlg.model import GPTModel

    for name, (folder, ckpts, want, _, _) in cases.items():
        cfg, full, _ = load_full_state(folder)
        assert cfg.rope_scaling == {k: v for k, v in CASES[name][2].items()}, name
        model = GPTModel(cfg).eval()
        load_into_model(model, full, 1, 0)
        with torch.no_grad():
            got = model.full_logits(_ids())
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        _, stage, _ = load_stage(ckpts[(1, 1)])  # the converted checkpoint's own file
        got = _stage_logits([stage], cfg, None)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # the scaling is really used: plain RoPE differs past the original context
    folder, _, want, _, _ = cases["llama3"]
    cfg, full, _ = load_full_state(folder)
    cfg.rope_scaling = None
    model = GPTModel(cfg).eval()
    load_into_model(model, full, 1, 0)
    with torch.no_grad():
        plain = model.full_logits(_ids())
    assert (plain[:, ORIGINAL:] - want[:, ORIGINAL:]).abs().max() > 1e-2


def _stage_logits(stages, cfg, tp_group) -> torch.Tensor:
    from mtnlg.tensor_parallel import gather_from_tp_region

    with torch.no_grad():
        x = stages[0].embedding(_ids())
        for st in stages:
            for block in st.layers.values():
                x = block(x)
        last = stages[-1]
        head = last.embedding if cfg.tied else last.output_layer
        logits = gather_from_tp_region(head.lm_logits(last.final_norm(x)), tp_group)
    return logits[..., : cfg.vocab_size]


def _tp2_logits(rank, world_size, ckpts):
    """Per checkpoint: logits from this TP rank's own files (PP2: both stages in turn)."""
    from mtnlg.distributed import ParallelDims, Topology
    from mtnlg.inference.stage import load_stage

    topo = Topology(ParallelDims(world_size=world_size, tp=world_size))
    out = []
    for ckpt, pp in ckpts:
        stages = []
        for s in range(pp):
            cfg, stage, _ = load_stage(ckpt, tp_group=topo.tp_group, stage=s, pp=pp)
            stages.append(stage)
        out.append(_stage_logits(stages, cfg, topo.tp_group))
    return out


@pytest.mark.timeout(400)
def test_tp2_and_tp2pp2_logits_equal_transformers(cases):
    keys = [(name, pp) for name in CASES for pp in (1, 2)]
    ckpts = [(cases[name][1][(2, pp)], pp) for name, pp in keys]
    results = run_distributed(_tp2_logits, 2, args=(ckpts,), timeout=380, start_method="forkserver")
    for rank, per_ckpt in enumerate(results):
        for (name, pp), got in zip(keys, per_ckpt):
            where = f"{name} TP2 PP{pp} rank {rank}"
            torch.testing.assert_close(
                got, cases[name][2], atol=1e-4, rtol=0, msg=lambda m, w=where: f"{w}: {m}"
            )


def _requests():
    from mtnlg.inference import Request, SamplingParams

    params = SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True)
    return [Request(tuple(p), params) for p in PROMPTS]


def _check_generation(name, res, model, ref):
    assert [r.tokens for r in res] == ref, name
    for prompt, r in zip(PROMPTS, res):
        with torch.no_grad():
            hf = model(torch.tensor([prompt + r.tokens])).logits[0]
        n = len(prompt)
        torch.testing.assert_close(
            torch.stack(r.logits), hf[n - 1 : n - 1 + len(r.tokens)], rtol=0, atol=1e-4,
            msg=lambda m: f"{name}: {m}",
        )  # fmt: skip


@pytest.mark.timeout(300)
def test_greedy_generation_equals_transformers_tp1(cases):
    from mtnlg.inference import Groups, InferenceEngine

    for name, (folder, ckpts, _, ref, model) in cases.items():
        assert max(len(p) + len(t) for p, t in zip(PROMPTS, ref)) > ORIGINAL + 8, name
        for path in (folder, ckpts[(1, 1)]):
            eng = InferenceEngine.load(path, Groups(), eod=EOS)
            res = eng.generate(_requests(), batch_size=2, return_logits=True)
            _check_generation(name, res, model, ref)


def _tp2pp2_generate(rank, world_size, ckpts: dict):
    import torch.distributed as dist

    from mtnlg.distributed.topology import ParallelDims, Topology
    from mtnlg.inference import Groups, InferenceEngine

    topo = Topology(ParallelDims(world_size=world_size, tp=2, pp=2))
    groups = Groups.from_topology(topo)
    out = {}
    for name, path in ckpts.items():
        eng = InferenceEngine.load(path, groups, eod=EOS)
        res = eng.generate(_requests(), batch_size=2, return_logits=True)
        out[name] = {"tokens": [r.tokens for r in res], "last": eng.is_last_stage}
        if eng.is_last_stage:
            out[name]["logits"] = [torch.stack(r.logits) for r in res]
        dist.barrier()
    return out


@pytest.mark.timeout(400)
def test_greedy_generation_equals_transformers_tp2pp2(cases):
    """4 ranks, each TP2 x PP2 checkpoint read from its own files; KV cache across stages."""
    ckpts = {name: str(c[1][(2, 2)]) for name, c in cases.items()}
    results = run_distributed(
        _tp2pp2_generate, 4, args=(ckpts,), timeout=380, start_method="forkserver"
    )
    for name, (_, _, _, ref, model) in cases.items():
        for rank, out in enumerate(results):
            assert out[name]["tokens"] == ref, f"{name} rank {rank}"
        last = [out[name] for out in results if out[name]["last"]]
        assert len(last) == 2
        for out in last:
            for prompt, tokens, got in zip(PROMPTS, ref, out["logits"]):
                with torch.no_grad():
                    hf = model(torch.tensor([prompt + tokens])).logits[0]
                n = len(prompt)
                torch.testing.assert_close(got, hf[n - 1 : n - 1 + len(tokens)], rtol=0, atol=1e-4)


@pytest.mark.timeout(300)
def test_round_trip_tensors_and_rope_parameters(cases, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    for name, (folder, ckpts, _, _, _) in cases.items():
        back = tmp_path / name
        mtnlg_to_hf(str(ckpts[(2, 2)]), str(back))
        a, b = load_file(folder / "model.safetensors"), load_file(back / "model.safetensors")
        assert sorted(a) == sorted(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
        src, out = AutoConfig.from_pretrained(folder), AutoConfig.from_pretrained(back)
        assert out.rope_parameters == src.rope_parameters, name
        assert out.rope_parameters == {**CASES[name][2], "rope_theta": 5000.0}, name
        written = json.loads((back / "config.json").read_text())["rope_parameters"]
        assert written == {**CASES[name][2], "rope_theta": 5000.0}, name
        assert out.max_position_embeddings == CASES[name][1]


def _hf_dict(**over) -> dict:
    d = json.loads(hf_config("llama", max_position_embeddings=128).to_json_string())
    d.pop("rope_parameters", None)
    d.update(over)
    return d


@pytest.mark.timeout(60)
def test_legacy_rope_scaling_reads_the_same():
    """A Llama 3.1 style file (``rope_scaling`` + top-level ``rope_theta``) and Qwen2.5's YaRN
    one (``type``, no ``original_max_position_embeddings`` default from max positions)."""
    llama3 = dict(CASES["llama3"][2])
    cfg = config_from_hf(_hf_dict(rope_theta=500000.0, rope_scaling=dict(llama3)))
    assert cfg.rotary_base == 500000.0 and cfg.rope_scaling == llama3
    new = config_from_hf(_hf_dict(rope_parameters={**llama3, "rope_theta": 500000.0}))
    assert new.rope_scaling == cfg.rope_scaling and new.rotary_base == cfg.rotary_base
    qwen = config_from_hf(_hf_dict(rope_scaling={"type": "yarn", "factor": 4.0}))
    assert qwen.rope_scaling == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "rope, match",
    [
        ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "longrope"),
        ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "x": 1}, "x"),
        ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
        ({"rope_type": "linear"}, "factor"),
    ],
)
def test_refused_scalings(rope, match):
    with pytest.raises(CheckpointError, match=match):
        config_from_hf(_hf_dict(rope_parameters={**rope, "rope_theta": 10000.0}))


@pytest.mark.timeout(60)
def test_model_config_round_trip_and_validation():
    scaling = dict(CASES["yarn-betas"][2])
    cfg = ModelConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=64,
        position_embedding_type="rope", rope_scaling=scaling,
    )  # fmt: skip
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.rope_scaling == scaling
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig(
            num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=64,
            position_embedding_type="rope", rope_scaling={"rope_type": "su", "factor": 2.0},
        )  # fmt: skip
    with pytest.raises(ValueError, match="position-embedding-type rope"):
        ModelConfig(
            num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=64,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        )  # fmt: skip


@pytest.mark.timeout(60)
def test_training_flags():
    from mtnlg.training.arguments import build_parser, model_config_from_args

    base = "--num-layers 1 --hidden-size 32 --num-attention-heads 4 --seq-length 64 "
    base += "--position-embedding-type rope "
    p = build_parser("t")
    args = p.parse_args((base + "--use-rope-scaling --rope-scaling-factor 32").split())
    cfg = model_config_from_args(args, 300)
    llama32 = {
        "rope_type": "llama3",
        "factor": 32.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    assert cfg.rope_scaling == llama32
    # a resume compares the flags' scaling with the checkpoint's
    from mtnlg.training import resume

    saved = ModelConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=64,
        position_embedding_type="rope",
    ).to_dict()  # fmt: skip
    found = resume.compare({"model": saved}, {}, resume.given_model_flags(args, saved))
    assert [(m.saved, m.given) for m in found] == [(None, llama32)]
    args = p.parse_args(
        (
            base + "--rope-scaling-type yarn --rope-scaling-factor 4 "
            "--rope-original-max-position-embeddings 16 --yarn-beta-fast 16"
        ).split()
    )
    cfg = model_config_from_args(args, 300)
    assert cfg.rope_scaling == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 16.0,
    }
    assert model_config_from_args(p.parse_args(base.split()), 300).rope_scaling is None
    with pytest.raises(SystemExit):
        model_config_from_args(p.parse_args((base + "--rope-scaling-factor 2").split()), 300)
    with pytest.raises(SystemExit):  # llama3's keys do not apply to linear
        bad = base + "--rope-scaling-type linear --rope-scaling-factor 2 --rope-low-freq-factor 1"
        model_config_from_args(p.parse_args(bad.split()), 300)


INV_FREQ_CASES = [
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 8192,
     "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096,
     "mscale": 1.0, "mscale_all_dim": 0.707, "truncate": False},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
     "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0},
]  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("head_dim", [8, 64, 128])
@pytest.mark.parametrize("scaling", INV_FREQ_CASES, ids=lambda s: s["rope_type"])
def test_inv_freq_bit_equal_to_transformers(scaling, head_dim):
    """Real-model shapes (theta 5e5, 131072 positions): frequencies and the cos/sin factor
    bit for bit equal to ``ROPE_INIT_FUNCTIONS`` (dynamic: at init and for a longer call)."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mtnlg.model.rotary import rope_inv_freq

    max_pos = 131072
    conf = transformers.LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
        max_position_embeddings=max_pos, rope_parameters={**scaling, "rope_theta": 5e5},
    )  # fmt: skip
    fn = ROPE_INIT_FUNCTIONS[scaling["rope_type"]]
    ours = dict(scaling)
    for seq_len in (None, 3 * max_pos + 5) if scaling["rope_type"] == "dynamic" else (None,):
        want, want_factor = fn(
            conf, None, seq_len=None if seq_len is None else torch.tensor(seq_len)
        )
        got, factor = rope_inv_freq(head_dim, 5e5, ours, max_pos, seq_len)
        assert torch.equal(got, want) and factor == want_factor, seq_len
