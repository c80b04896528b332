"""Pruned checkpoints: the same model whatever TP x PP they are written at, exported to a Hugging
Face folder that ``from_pretrained`` alone loads and that gives our logits; slices checked
against the original ``transformers`` model with the pruned heads / neurons / blocks masked
out; parameter counts equal to the planner's and to transformers'."""

from __future__ import annotations

import pytest
import torch

from tests.compression.test_prune_importance import calibrate


@pytest.fixture(scope="module")
def scores(gpt2, llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("scores")
    return {
        m["name"]: calibrate(m, "tp1", d / f"{m['name']}.safetensors", 1) for m in (gpt2, llama)
    }


def prune(model: dict, scores: dict, out, tp: int, pp: int, **spec):
    from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint
    from mtnlg.compression.pruning import prune_checkpoint
    from mtnlg.compression.targets import PruneSpec, resolve_target

    cfg = DSCheckpoint(model["tp1"]).cfg
    target = resolve_target(PruneSpec(**spec), cfg, scores, tp, pp)
    prune_checkpoint(model["tp1"], out, target, tp, pp)
    return target


def merged(path) -> dict:
    from mtnlg.checkpoint import rules
    from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint

    ckpt = DSCheckpoint(path)
    out = {}
    for g in rules.layer_groups(ckpt.cfg):
        out.update(ckpt.full_group(g, keep_dtype=True))
    return out


def our_logits(path, ids):
    from mtnlg.checkpoint import load_full_state, load_into_model
    from mtnlg.model import GPTModel
    from mtnlg.tensor_parallel import skip_init

    cfg, full, _ = load_full_state(path)
    with skip_init():
        model = GPTModel(cfg)
    load_into_model(model, full, 1, 0)
    return model.eval().full_logits(ids)


def hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits, hf


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def masked_reference(model: dict, target, ids):
    """The original transformers model with the dropped heads' and neurons' output weights zeroed
    and the dropped blocks removed: the function the pruned model must compute exactly."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model["hf"], dtype=torch.float32).eval()
    gpt2 = model["name"] == "gpt2"
    blocks = hf.transformer.h if gpt2 else hf.model.layers
    d = hf.config.hidden_size // hf.config.num_attention_heads
    for i, b in enumerate(blocks):
        if target.heads is not None and i in target.heads:
            drop = [h for h in range(hf.config.num_attention_heads) if h not in target.heads[i]]
            ch = torch.tensor([h * d + c for h in drop for c in range(d)], dtype=torch.long)
            if gpt2:
                b.attn.c_proj.weight[ch, :] = 0  # Conv1D (in, out)
            else:
                b.self_attn.o_proj.weight[:, ch] = 0
        if target.ffn is not None and i in target.ffn:
            keep = set(target.ffn[i].tolist())
            ffn = b.mlp.c_proj.weight.shape[0] if gpt2 else b.mlp.down_proj.weight.shape[1]
            drop = torch.tensor([j for j in range(ffn) if j not in keep], dtype=torch.long)
            if gpt2:
                b.mlp.c_proj.weight[drop, :] = 0
            else:
                b.mlp.down_proj.weight[:, drop] = 0
    kept = torch.nn.ModuleList([blocks[i] for i in target.layers])
    if gpt2:
        hf.transformer.h, hf.config.n_layer = kept, len(kept)
    else:
        hf.model.layers, hf.config.num_hidden_layers = kept, len(kept)
    return hf(ids, use_cache=False).logits


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_heads_neurons_layers(family, request, scores, tmp_path):
    """Heads, neurons and blocks pruned: TP2 x PP2 output == TP1 output, computing what the
    original transformers model computes with those heads, neurons and blocks masked out; the
    Llama export loads with from_pretrained alone and gives our logits (GPT-2 with fewer heads
    but the same width has no GPT2Config: test_hidden_channels exports GPT-2)."""
    from mtnlg.checkpoint.convert import mtnlg_to_hf

    model = request.getfixturevalue(family)
    s = scores[family]
    spec = dict(num_attention_heads=2, ffn_hidden_size=128 if family == "gpt2" else 24,
                num_layers=3)  # fmt: skip
    t1 = prune(model, s, tmp_path / "p1", 1, 1, **spec)
    prune(model, s, tmp_path / "p22", 2, 2, **spec)
    a, b = merged(tmp_path / "p1"), merged(tmp_path / "p22")
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the layers dropped are those of lowest block importance; GQA keeps both groups whole
    bi = s["block_importance"]
    assert bi[[i for i in range(4) if i not in t1.layers][0]] == bi.min()
    if family == "llama":
        assert t1.cfg.num_query_groups == 2
        for heads in t1.heads.values():  # one head of each group: {0, 1} and {2, 3}
            assert heads[0] in (0, 1) and heads[1] in (2, 3)
    ids = _ids(t1.cfg.vocab_size)
    ours = our_logits(tmp_path / "p22", ids)
    torch.testing.assert_close(ours, masked_reference(model, t1, ids), rtol=1e-4, atol=1e-4)
    # parameter counts: the checkpoint's tensors, ModelConfig's and the planner's
    from mtnlg.planning import stage_params

    n = sum(t.numel() for t in a.values())
    cfg = t1.cfg
    pad = (cfg.padded_vocab_size(1) - cfg.vocab_size) * cfg.hidden_size * (1 if cfg.tied else 2)
    assert n == cfg.num_parameters()
    assert n + pad == stage_params(cfg, 1, 1)[0].params_unique
    if family == "llama":  # 2 heads of head dim 8 over hidden 32: kv_channels explicit
        assert cfg.kv_channels == 8
        mtnlg_to_hf(str(tmp_path / "p22"), str(tmp_path / "hf"))
        theirs, hf = hf_logits(tmp_path / "hf", ids)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
        assert hf.num_parameters() == n
        # and back: a Llama folder whose head_dim is not hidden / heads converts exactly (as
        # plain MHA: 2 KV heads for 2 heads; the pruned checkpoint keeps its grouped layout)
        from mtnlg.checkpoint.convert import hf_to_mtnlg

        hf_to_mtnlg(str(tmp_path / "hf"), str(tmp_path / "back"), 2, 1, 8)
        torch.testing.assert_close(our_logits(tmp_path / "back", ids), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hidden_channels(family, request, scores, tmp_path):
    """Hidden channels pruned (tied embedding / untied output layer sliced with them): GPT-2
    prunes heads with them (head dim kept), Llama keeps its heads, so head_dim is explicit in the
    config and carried by the export."""
    import json

    from mtnlg.checkpoint.convert import mtnlg_to_hf

    model = request.getfixturevalue(family)
    spec = dict(hidden_size=32, num_attention_heads=2) if family == "gpt2" else dict(hidden_size=16)
    t = prune(model, scores[family], tmp_path / "p", 2, 1, **spec)
    assert t.hidden is not None and len(t.hidden) == t.cfg.hidden_size
    mtnlg_to_hf(str(tmp_path / "p"), str(tmp_path / "hf"))
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    if family == "llama":
        assert t.cfg.kv_channels == 8 and conf["head_dim"] == 8 and conf["hidden_size"] == 16
    else:
        assert t.cfg.kv_channels is None and conf["n_embd"] == 32 and conf["n_head"] == 2
    ids = _ids(t.cfg.vocab_size)
    theirs, hf = hf_logits(tmp_path / "hf", ids)
    torch.testing.assert_close(theirs, our_logits(tmp_path / "p", ids), rtol=1e-4, atol=1e-4)
    assert hf.num_parameters() == t.cfg.num_parameters()


@pytest.mark.parametrize("hidden", [32, 30])  # 30: not even divisible by the 4 heads
def test_gpt2_shape_gpt2config_cannot_express_is_refused(gpt2, scores, tmp_path, hidden):
    """Hidden pruned without the heads: kv_channels != hidden / heads; the mtnlg model is valid
    (it trains and evaluates), but its GPT-2 export is refused by name, nothing written."""
    from mtnlg.checkpoint.convert import mtnlg_to_hf
    from mtnlg.checkpoint.rules import CheckpointError

    t = prune(gpt2, scores["gpt2"], tmp_path / "p", 1, 1, hidden_size=hidden)
    assert t.cfg.hidden_size == hidden
    assert t.cfg.kv_channels == 16 and t.cfg.attention_dim == 64
    ids = _ids(t.cfg.vocab_size)
    assert torch.isfinite(our_logits(tmp_path / "p", ids)).all()
    with pytest.raises(CheckpointError, match="GPT2Config cannot express kv_channels=16"):
        mtnlg_to_hf(str(tmp_path / "p"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("strategy", ["width", "depth"])
def test_target_params(gpt2, llama, scores, strategy):
    """--target-params N: a shape with at most N parameters; width keeps GPT-2 a GPT-2 and the
    Llama heads; depth drops the least important blocks."""
    from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint
    from mtnlg.compression.targets import PruneSpec, resolve_target

    for m in (gpt2, llama):
        cfg = DSCheckpoint(m["tp1"]).cfg
        import dataclasses

        block = cfg.num_parameters() - dataclasses.replace(cfg, num_layers=3).num_parameters()
        n = int(
            cfg.num_parameters() * 0.7
            if strategy == "width"
            else cfg.num_parameters() - 1.5 * block
        )
        spec = PruneSpec(params=n, strategy=strategy, width_multiple=8)
        t = resolve_target(spec, cfg, scores[m["name"]], 2, 1)
        assert 0.6 * n < t.cfg.num_parameters() <= n
        if strategy == "width":
            assert t.cfg.num_layers == cfg.num_layers
            assert t.cfg.head_dim == cfg.head_dim
            assert t.cfg.gpt2_compatible == cfg.gpt2_compatible
            assert t.cfg.hidden_size % 8 == 0 and t.cfg.ffn_hidden_size % 8 == 0
        else:  # two blocks: the two of lowest importance
            assert t.cfg.hidden_size == cfg.hidden_size and t.cfg.num_layers == 2
            dropped = [i for i in range(4) if i not in t.layers]
            bi = scores[m["name"]]["block_importance"]
            assert sorted(bi[dropped].tolist()) == sorted(bi.tolist())[:2]


@torch.no_grad()
def test_width_prune_equals_sliced_transformers_model(gpt2, scores, tmp_path):
    """Hidden channels, heads and neurons pruned together: the pruned model equals a
    ``GPT2LMHeadModel`` whose tensors this test slices itself from the original HF state dict
    (Conv1D layout, fused c_attn as q | k | v), an independent statement of the slicing rules."""
    from transformers import GPT2Config, GPT2LMHeadModel

    t = prune(gpt2, scores["gpt2"], tmp_path / "p", 2, 2, hidden_size=32, num_attention_heads=2,
              ffn_hidden_size=128)  # fmt: skip
    src = GPT2LMHeadModel.from_pretrained(gpt2["hf"], dtype=torch.float32)
    c = src.config
    d, H = c.n_embd // c.n_head, c.n_embd
    hid = t.hidden
    sd = {}
    for k, v in src.state_dict().items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if k in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"):
            sd[k] = v[:, hid]
        elif ".ln_" in k or k.startswith("transformer.ln_f"):
            sd[k] = v[hid]
        else:
            i = int(k.split(".")[2])
            heads = [h * d + j for h in t.heads[i].tolist() for j in range(d)]
            qkv = torch.tensor([p * H + ch for p in range(3) for ch in heads])
            ffn, heads = t.ffn[i], torch.tensor(heads)
            rows, cols = {  # (rows, columns) kept, Conv1D (in, out) layout; None: all
                "attn.c_attn.weight": (hid, qkv), "attn.c_attn.bias": (qkv, None),
                "attn.c_proj.weight": (heads, hid), "attn.c_proj.bias": (hid, None),
                "mlp.c_fc.weight": (hid, ffn), "mlp.c_fc.bias": (ffn, None),
                "mlp.c_proj.weight": (ffn, hid), "mlp.c_proj.bias": (hid, None),
            }[k.split(".", 3)[3]]  # fmt: skip
            sd[k] = v[rows] if cols is None else v[rows][:, cols]
    cfg = GPT2Config(**{**c.to_dict(), "n_embd": 32, "n_head": 2, "n_inner": 128})
    ref = GPT2LMHeadModel(cfg).eval()
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and all(m.endswith("attn.bias") or m == "lm_head.weight" for m in missing)
    ids = _ids(t.cfg.vocab_size)
    torch.testing.assert_close(our_logits(tmp_path / "p", ids), ref(ids).logits, rtol=1e-4,
                               atol=1e-4)  # fmt: skip
