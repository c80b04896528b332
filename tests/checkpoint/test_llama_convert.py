"""Llama / Mistral / Qwen2 <-> mtnlg at TP1, TP2 and TP2 x PP2, checked against ``transformers``.

Tiny random models (``llama_models.py``: GQA 4 heads / 2 KV groups; Llama untied, Qwen2 with a
QKV bias; plus an MQA Llama whose one KV group both TP2 ranks share) are converted by ``hf_to_mtnlg``. Every TP rank then reads its own DeepSpeed files
(file names hard-coded here, not the converter's reader) into ``GPTModel`` at its TP degree on
gloo processes, and the gathered logits must equal ``transformers``' (1e-4, fp32). Converting
back gives the very tensors of the source folder, and ``AutoModelForCausalLM`` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtnlg.checkpoint import CheckpointError, load_full_state, load_into_model
from mtnlg.checkpoint.convert import hf_to_mtnlg, mtnlg_to_hf, reshard
from mtnlg.checkpoint.hf_llama import fuse_qkv, hf_to_ours_name, ours_to_hf_names, split_qkv
from mtnlg.checkpoint.verify import verify
from tests.checkpoint.llama_models import EOS, FAMILIES, VOCAB, hf_config, make_hf_llama
from tests.e2e.conftest import demo_prefix  # noqa: F401 - fixture of the slow test
from tests.helpers.dist import run_distributed

LAYOUTS = [(1, 1), (2, 1), (2, 2)]  # (tp, pp)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama_hf")
    out = {}
    for i, family in enumerate(FAMILIES):
        out[family] = root / family
        make_hf_llama(out[family], family, seed=i)
    return out


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory) -> dict[tuple[str, int, int], Path]:
    root = tmp_path_factory.mktemp("llama_ck")
    out = {}
    for family, folder in hf_dirs.items():
        for tp, pp in LAYOUTS:
            ck = out[(family, tp, pp)] = root / f"{family}-tp{tp}pp{pp}"
            hf_to_mtnlg(str(folder), str(ck), tp, pp, make_vocab_size_divisible_by=8)
    return out


@pytest.fixture(scope="module")
def reference(hf_dirs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random ids (2, 24) and each family's ``transformers`` logits (2, 24, V)."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    logits = {}
    for family, folder in hf_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[family] = model(ids).logits
    return ids, logits


def rank_state(ckpt: Path, tp_rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config dict, TP rank ``tp_rank``'s state) read from DeepSpeed's file names.

    PP=1: ``mp_rank_{r}_model_states.pt["module"]``. PP>1: ``layer_{idx}-model_{r}`` files,
    0 embedding, 1..L blocks, L+1 final norm, L+2 the untied output layer (key ``weight``).
    """
    d = ckpt / (ckpt / "latest").read_text().strip()
    meta = json.loads((d / "mtnlg_meta.json").read_text())
    if meta["parallel"]["pp"] == 1:
        path = d / f"mp_rank_{tp_rank:02d}_model_states.pt"
        return meta["model"], torch.load(path, weights_only=True)["module"]
    n = meta["model"]["num_layers"]
    prefixes = {0: "embedding.", n + 1: "final_norm.", n + 2: "output_layer."}
    state = {}
    for idx in range(n + 3):
        path = d / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt"
        if idx == n + 2 and not meta["model"]["untie_embeddings_and_output_weights"]:
            assert not path.exists(), path  # tied: the embedding is the head
            continue
        sd = torch.load(path, weights_only=True)
        state.update({prefixes.get(idx, f"layers.{idx - 1}.") + k: v for k, v in sd.items()})
    return meta["model"], state


def _shard_logits(rank, world_size, ckpts):
    """Each checkpoint's TP-rank state in ``GPTModel`` at TP=world_size: logits (b, s, V)."""
    from mtnlg.config import ModelConfig
    from mtnlg.distributed import ParallelDims, Topology
    from mtnlg.model import GPTModel

    topo = Topology(ParallelDims(world_size=world_size, tp=world_size))
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    out = []
    for ckpt in ckpts:
        model_cfg, state = rank_state(ckpt, topo.tp_rank)
        model = GPTModel(ModelConfig.from_dict(model_cfg), tp_group=topo.tp_group).eval()
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            out.append(model.full_logits(ids))
    return out


def _pipeline_logits(rank, world_size, ckpts):
    """Each TP2 x PP2 checkpoint as its two pipeline stages (``load_stage``: each stage reads
    only its own files), run one after the other on this TP rank: logits (b, s, V)."""
    from mtnlg.distributed import ParallelDims, Topology
    from mtnlg.inference.stage import load_stage
    from mtnlg.tensor_parallel import gather_from_tp_region

    topo = Topology(ParallelDims(world_size=world_size, tp=world_size))
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    out = []
    for ckpt in ckpts:
        cfg, first, _ = load_stage(ckpt, tp_group=topo.tp_group, stage=0, pp=2)
        _, last, _ = load_stage(ckpt, tp_group=topo.tp_group, stage=1, pp=2)
        with torch.no_grad():
            x = first.embedding(ids)  # (b, s, h)
            for block in [*first.layers.values(), *last.layers.values()]:
                x = block(x)
            head = last.embedding if cfg.tied else last.output_layer
            logits = gather_from_tp_region(head.lm_logits(last.final_norm(x)), topo.tp_group)
        out.append(logits[..., : cfg.vocab_size])
    return out


def _both(rank, world_size, ckpts):
    pipelined = [c for c in ckpts if c.name.endswith("pp2")]
    return _shard_logits(rank, world_size, ckpts) + _pipeline_logits(rank, world_size, pipelined)


def test_tp1_logits_equal_transformers(hf_dirs, converted, reference):
    """TP1: the checkpoint's own file, and the HF folder read directly (inference/teacher)."""
    from mtnlg.config import ModelConfig
    from mtnlg.model import GPTModel

    ids, want = reference
    for family in FAMILIES:
        model_cfg, state = rank_state(converted[(family, 1, 1)], 0)
        model = GPTModel(ModelConfig.from_dict(model_cfg)).eval()
        model.load_state_dict(state, strict=True)
        got = model.full_logits(ids)
        torch.testing.assert_close(got, want[family], atol=1e-4, rtol=0, msg=family)
        cfg, full, _ = load_full_state(hf_dirs[family])
        model = GPTModel(cfg).eval()
        load_into_model(model, full, 1, 0)
        torch.testing.assert_close(model.full_logits(ids), want[family], atol=1e-4, rtol=0)


@pytest.mark.timeout(300)
def test_tp2_and_tp2pp2_shards_give_transformers_logits(converted, reference):
    """One 2-process run: every family at TP2 and TP2 x PP2, each rank from its own files, and
    the TP2 x PP2 ones again as two pipeline stages."""
    _, want = reference
    keys = [(f, tp, pp) for f in FAMILIES for tp, pp in LAYOUTS if tp == 2]
    results = run_distributed(
        _both, 2, args=([converted[k] for k in keys],), timeout=280, start_method="forkserver"
    )
    keys += [(f, 2, "2 (pipeline stages)") for f in FAMILIES]
    for rank, per_ckpt in enumerate(results):
        for (family, tp, pp), logits in zip(keys, per_ckpt):
            where = f"{family} TP{tp} PP{pp} rank {rank}"
            torch.testing.assert_close(
                logits, want[family], atol=1e-4, rtol=0, msg=lambda m, w=where: f"{w}: {m}"
            )


def test_back_to_hf_identical_and_loadable(hf_dirs, converted, reference, tmp_path):
    """TP2 x PP2 -> HF: the source's tensors bit for bit, the same config options, the same
    logits through ``AutoModelForCausalLM``, and the tokenizer carried both ways."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids, want = reference
    for family, folder in hf_dirs.items():
        back = tmp_path / family
        mtnlg_to_hf(str(converted[(family, 2, 2)]), str(back))
        a, b = load_file(folder / "model.safetensors"), load_file(back / "model.safetensors")
        assert sorted(a) == sorted(b), family
        assert all(torch.equal(a[k], b[k]) for k in a), family
        src, out = (json.loads((f / "config.json").read_text()) for f in (folder, back))
        for key in ("architectures", "model_type", "num_key_value_heads", "tie_word_embeddings"):
            assert out[key] == src[key], (family, key)
        assert out["rope_parameters"]["rope_theta"] == 5000.0
        model = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, want[family], atol=0, rtol=0)
        text = "Hello world <|endoftext|>"
        ref = AutoTokenizer.from_pretrained(folder)(text).input_ids
        assert ref[-1] == 256 and AutoTokenizer.from_pretrained(back)(text).input_ids == ref
        assert json.loads((back / "tokenizer_config.json").read_text())["eos_token"] == EOS
        _, _, tok = load_full_state(converted[(family, 2, 2)])  # the checkpoint's copy
        assert tok.eod == 256 and tok.tokenize(text) == ref


def test_reshard_and_verify_untied(hf_dirs, converted, tmp_path):
    """The untied output layer (pipeline layer L+2) survives a reshard; ``--verify`` passes."""
    src = converted[("llama", 2, 2)]
    out = tmp_path / "r11"
    reshard(str(src), str(out), tp=1, pp=1)
    report = verify("reshard", str(src), str(out))
    assert report.logit_diff == 0.0 and report.tensor_diff == 0.0
    report = verify("hf-to-mtnlg", str(hf_dirs["llama"]), str(out))
    assert report.tensor_diff == 0.0 and report.logit_diff < 1e-4


def test_cli_round_trip_with_verify(hf_dirs, tmp_path, capsys):
    """The CLI both ways on Qwen2 (QKV bias), each with ``--verify`` (logits via transformers);
    the export in several safetensors shards, read back through their index."""
    from checkpoint_tools.convert_checkpoint import main

    ck, back = str(tmp_path / "ck"), str(tmp_path / "back")
    src = str(hf_dirs["qwen2"])
    argv = ["hf-to-mtnlg", "--input", src, "--output", ck, "--tp", "2", "--pp", "2", "--verify"]
    assert main(argv) == 0
    shards = ["--max-shard-size", "20000"]  # several safetensors files and their index
    assert main(["mtnlg-to-hf", "--input", ck, "--output", back, "--verify", *shards]) == 0
    out = capsys.readouterr().out
    assert out.count("every tensor identical") == 2, out
    assert len(list((tmp_path / "back").glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == [
        "Qwen2ForCausalLM"
    ]


def test_name_table_and_gqa_fusion():
    """HF names map both ways; the fused QKV rows are [q heads of group j | k_j | v_j] per
    group j (built here head by head), and [q | k | v] for plain MHA."""
    assert hf_to_ours_name("model.layers.3.self_attn.k_proj.bias", tied=True) == (
        "layers.3.attention.qkv.bias",
        "k",
    )
    assert hf_to_ours_name("lm_head.weight", tied=True) is None
    assert hf_to_ours_name("lm_head.weight", tied=False) == ("output_layer.weight", None)
    assert [n for n, _ in ours_to_hf_names("layers.1.mlp.up.weight")] == [
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ]
    with pytest.raises(CheckpointError, match=r"unknown Hugging Face key 'model\.layers\.0\.x'"):
        hf_to_ours_name("model.layers.0.x", tied=True)

    from mtnlg.config import ModelConfig

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2)
    d = cfg.head_dim
    q, k, v = torch.randn(32, 5), torch.randn(16, 5), torch.randn(16, 5)
    rows = []
    for j in range(2):  # heads 2j, 2j+1 use KV group j (HF repeat_kv)
        rows += [q[(2 * j + i) * d : (2 * j + i + 1) * d] for i in range(2)]
        rows += [k[j * d : (j + 1) * d], v[j * d : (j + 1) * d]]
    fused = fuse_qkv(q, k, v, cfg)
    assert torch.equal(fused, torch.cat(rows))
    assert all(torch.equal(x, y) for x, y in zip(split_qkv(fused, cfg), (q, k, v)))
    mha = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4)
    q, k, v = torch.randn(3, 32).unbind()
    assert torch.equal(fuse_qkv(q, k, v, mha), torch.cat([q, k, v]))


def test_config_mapping(hf_dirs, converted):
    cfg, _, _ = load_full_state(hf_dirs["qwen2"])
    assert (cfg.num_query_groups, cfg.ffn_hidden_size, cfg.rotary_base) == (2, 48, 5000.0)
    assert (cfg.layernorm_epsilon, cfg.max_position_embeddings, cfg.hidden_dropout) == (
        1e-5,
        64,
        0.0,
    )
    assert cfg.add_qkv_bias and not cfg.add_bias_linear and cfg.tied and cfg.swiglu
    assert (cfg.position_embedding_type, cfg.normalization) == ("rope", "rmsnorm")
    meta = converted[("llama", 2, 2)] / "iter_0000000" / "mtnlg_meta.json"
    model = json.loads(meta.read_text())["model"]
    assert model["extra"]["hf_architecture"] == "LlamaForCausalLM"
    assert model["untie_embeddings_and_output_weights"] and not model["add_qkv_bias"]
    cfg, _, _ = load_full_state(hf_dirs["llama"])
    assert cfg.num_query_groups == 2
    mha = hf_config("mistral", num_key_value_heads=4).to_dict()
    from mtnlg.checkpoint.hf import config_from_hf, export_architecture

    assert config_from_hf({**mha, "model_type": "mistral"}).num_query_groups is None
    cfg.extra.pop("hf_architecture")
    assert export_architecture(cfg) == "LlamaForCausalLM"
    cfg.add_qkv_bias = True
    assert export_architecture(cfg) == "Qwen2ForCausalLM"
    cfg.extra["hf_architecture"] = "GPT2LMHeadModel"
    with pytest.raises(
        CheckpointError, match="GPT2LMHeadModel export: this model config is not GPT-2"
    ):
        export_architecture(cfg)


def _variant(src: Path, dst: Path, config: dict | None = None, change=None) -> Path:
    """A copy of an HF folder with ``config`` merged into config.json and ``change`` applied
    to its tensors."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    conf = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**conf, **(config or {})}))
    state = load_file(src / "model.safetensors")
    if change is not None:
        change(state)
    save_file(state, dst / "model.safetensors")
    return dst


REFUSALS = [
    # RoPE scaling (tests/checkpoint/test_llama_rope_scaling.py): what is still refused
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     None, r"rope_parameters=.*llama3: missing \['low_freq_factor', 'high_freq_factor'\]"),
    ("llama", {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     None, r"rope_scaling\.type='longrope'"),
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                   "beta_fastest": 64}},
     None, r"rope_parameters\.beta_fastest=64 .*not computed for yarn"),
    ("llama", {"partial_rotary_factor": 0.5}, None, r"partial_rotary_factor=0\.5"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1,
               "layer_types": None}, None, r"max_window_layers=1 .*some layers only"),
    ("mistral", {"sliding_window": 16, "layer_types": ["full_attention", "sliding_attention"]},
     None, r"layer_types=.*some layers only"),
    ("llama", {"attention_bias": True}, None, r"attention_bias=True"),
    ("llama", {"mlp_bias": True}, None, r"mlp_bias=True"),
    ("llama", {"head_dim": 16}, None, r"_proj\.weight has shape \(16, 32\), the config .* says \(32, 32\)"),
    ("mistral", {"hidden_act": "gelu"}, None, r"hidden_act='gelu'"),
    ("llama", None, lambda s: s.update({"model.layers.0.self_attn.o_proj.bias": torch.ones(32)}),
     r"unknown Hugging Face key 'model\.layers\.0\.self_attn\.o_proj\.bias'"),
    ("qwen2", None, lambda s: s.pop("model.layers.1.self_attn.k_proj.bias"),
     r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"),
    ("llama", None, lambda s: s.pop("lm_head.weight"), r"missing tensor for 'output_layer"),
    ("mistral", None,
     lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"] + 1}),
     r"lm_head\.weight differs from model\.embed_tokens\.weight"),
]  # fmt: skip


@pytest.mark.parametrize(
    "family, config, change, error",
    REFUSALS,
    ids=["llama3-incomplete", "longrope-scaling", "yarn-unknown-key", "partial-rotary",
         "qwen2-some-layers-slide", "mistral-layer-types", "attention-bias", "mlp-bias", "head-dim", "gelu", "unknown-key",
         "missing-k-bias", "missing-lm-head", "tied-head-differs"],
)  # fmt: skip
def test_refusals(hf_dirs, tmp_path, family, config, change, error):
    bad = _variant(hf_dirs[family], tmp_path / "bad", config, change)
    with pytest.raises(CheckpointError, match=error):
        hf_to_mtnlg(str(bad), str(tmp_path / "out"), tp=2, pp=1)
    assert not (tmp_path / "out").exists()


def test_gqa_layout_refusal():
    from mtnlg.checkpoint.convert import check_layout
    from mtnlg.config import ModelConfig

    cfg = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=6, num_query_groups=3)
    check_layout(cfg, 3, 1)
    with pytest.raises(CheckpointError, match=r"num-query-groups|query.groups"):
        check_layout(cfg, 2, 1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_untied_gqa_reshard_with_optimizer_continues(demo_prefix, tmp_path):  # noqa: F811
    """ZeRO-1 training state of an untied GQA Llama-style model at TP2 x PP2, resharded with its
    optimizer state to TP1 x PP1 and TP1 x PP2 x DP2: both continue with the losses of the
    uninterrupted run (the output layer's and the untied embedding's engine names and ZeRO
    order at PP > 1). ~90 s on 2 cores."""
    from tests.e2e.test_checkpoints_dp import HALF, TAG, args, run

    llama = ["--position-embedding-type", "rope", "--normalization", "rmsnorm", "--swiglu",
             "--num-query-groups", "2", "--untie-embeddings-and-output-weights",
             "--disable-bias-linear", "--ffn-hidden-size", "96"]  # fmt: skip
    ck, r111, r212 = (str(tmp_path / n) for n in ("ck", "r111", "r212"))
    jobs = [
        ("train", args(demo_prefix, 2, 2, [*llama, "--save", ck, "--save-interval", str(HALF)])),
        ("reshard", dict(input=ck, output=r111, tp=1, pp=1, dp=1, tag=TAG)),
        ("reshard", dict(input=ck, output=r212, tp=1, pp=2, dp=2, tag=TAG)),
        ("train", args(demo_prefix, 1, 2, [*llama, "--load", r212])),
    ]
    straight, _, _, resumed_212 = run(jobs, 4)
    (resumed_111,) = run([("train", args(demo_prefix, 1, 1, [*llama, "--load", r111]))], 1)
    meta = json.loads((tmp_path / "r111" / TAG / "mtnlg_meta.json").read_text())
    assert meta["weights_only"] is False
    assert resumed_111 == pytest.approx(straight[HALF:], rel=1e-4)
    assert resumed_212 == pytest.approx(straight[HALF:], rel=1e-4)
