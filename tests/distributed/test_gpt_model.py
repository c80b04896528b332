"""The whole GPT at TP=2 against TP=1 with the same weights; collectives counted per block."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.gpt_helpers import batches, gather_grad, gather_param, tiny_config
from tests.helpers.dist import run_distributed

SEED = 1234


def _tp_vs_tp1(rank, world_size):
    from mtnlg.distributed import ParallelDims, Topology
    from mtnlg.model import GPTModel

    topo = Topology(ParallelDims(world_size=world_size, tp=world_size))
    cfg = tiny_config()
    ref = GPTModel(cfg, tp_group=None, seed=SEED)  # TP=1 reference, same seed
    model = GPTModel(cfg, tp_group=topo.tp_group, seed=SEED)
    ((ids, labels),) = batches(cfg, 1, micro_batch=3)

    # Same weights: every TP shard merges back into the TP=1 tensor.
    # (The TP=1 vocabulary is padded to 8, the TP=2 one to 16: compare the common rows.)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        full, want = gather_param(p, topo.tp_group), ref_params[name].detach()
        rows = min(full.shape[0], want.shape[0])
        torch.testing.assert_close(full[:rows], want[:rows], rtol=0, atol=0, msg=name)

    logits = model.full_logits(ids)
    ref_logits = ref.full_logits(ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)

    loss = model(ids, labels)
    ref_loss = ref(ids, labels)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        g, want = gather_grad(p, topo.tp_group), ref_params[name].grad
        rows = min(g.shape[0], want.shape[0])
        torch.testing.assert_close(g[:rows], want[:rows], rtol=1e-5, atol=1e-6, msg=name)
    return float(loss)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp", [2, 4])
def test_gpt_tp_matches_tp1(tp):
    losses = run_distributed(_tp_vs_tp1, world_size=tp, timeout=200, start_method="forkserver")
    assert len(set(losses)) == 1  # every TP rank computed the same loss


def _count_block_collectives(rank, world_size):
    import torch.distributed as dist

    from mtnlg.distributed import ParallelDims, Topology
    from mtnlg.model.layers import TransformerBlock

    topo = Topology(ParallelDims(world_size=world_size, tp=world_size))
    cfg = tiny_config()
    torch.manual_seed(0)
    block = TransformerBlock(cfg, topo.tp_group)
    x = torch.randn(2, cfg.seq_length, cfg.hidden_size, requires_grad=True)

    counts: dict[str, int] = {}
    names = [
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "broadcast",
        "all_to_all_single",
    ]
    originals = {n: getattr(dist, n) for n in names}

    def wrap(n):
        def counted(*args, **kwargs):
            counts[n] = counts.get(n, 0) + 1
            return originals[n](*args, **kwargs)

        return counted

    for n in names:
        setattr(dist, n, wrap(n))
    try:
        y = block(x)
        forward = dict(counts)
        counts.clear()
        y.sum().backward()
        backward = dict(counts)
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)
    return forward, backward


@pytest.mark.timeout(120)
def test_block_costs_two_all_reduces_each_way():
    for forward, backward in run_distributed(
        _count_block_collectives, world_size=2, timeout=100, start_method="forkserver"
    ):
        assert forward == {"all_reduce": 2}
        assert backward == {"all_reduce": 2}


def test_plain_model_matches_transformers_gpt2():
    """TP=1 logits equal Hugging Face GPT2LMHeadModel's with the same weights (fp32)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mtnlg.model import GPTModel

    cfg = tiny_config(make_vocab_size_divisible_by=1)
    model = GPTModel(cfg, seed=7).eval()
    hf = GPT2LMHeadModel(
        GPT2Config(
            n_layer=cfg.num_layers,
            n_embd=cfg.hidden_size,
            n_head=cfg.num_attention_heads,
            n_positions=cfg.max_position_embeddings,
            vocab_size=cfg.vocab_size,
            activation_function="gelu_new",
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
            layer_norm_epsilon=cfg.layernorm_epsilon,
        )
    ).eval()
    sd = {
        "transformer.wte.weight": model.embedding.word_embeddings.weight,
        "transformer.wpe.weight": model.embedding.position_embeddings.weight,
        "transformer.ln_f.weight": model.final_norm.weight,
        "transformer.ln_f.bias": model.final_norm.bias,
    }
    for i, blk in enumerate(model.layers):
        p = f"transformer.h.{i}."
        # HF Conv1D stores (in, out): the transpose of nn.Linear.
        sd.update(
            {
                p + "ln_1.weight": blk.ln_1.weight,
                p + "ln_1.bias": blk.ln_1.bias,
                p + "attn.c_attn.weight": blk.attention.qkv.weight.t(),
                p + "attn.c_attn.bias": blk.attention.qkv.bias,
                p + "attn.c_proj.weight": blk.attention.dense.weight.t(),
                p + "attn.c_proj.bias": blk.attention.dense.bias,
                p + "ln_2.weight": blk.ln_2.weight,
                p + "ln_2.bias": blk.ln_2.bias,
                p + "mlp.c_fc.weight": blk.mlp.up.weight.t(),
                p + "mlp.c_fc.bias": blk.mlp.up.bias,
                p + "mlp.c_proj.weight": blk.mlp.down.weight.t(),
                p + "mlp.c_proj.bias": blk.mlp.down.bias,
            }
        )
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("lm_head" in k or "attn.bias" in k for k in missing)
    hf.tie_weights()
    ((ids, labels),) = batches(cfg, 1, micro_batch=2)
    with torch.no_grad():
        want = hf(ids).logits
        got = model.full_logits(ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want_loss = torch.nn.functional.cross_entropy(want.flatten(0, 1), labels.flatten())
        torch.testing.assert_close(model(ids, labels), want_loss, rtol=1e-5, atol=1e-6)
