"""Grouped-query attention under TP against TP=1: forward, gradients, one copy of each weight.

TP1 runs in the parent; TP2 and TP4 in spawned ranks, each with the same seed. Layouts: groups
split over ranks (g % tp == 0) and groups shared by ranks (tp % g == 0: K/V rows split among the
sharing ranks, all-gathered in the forward), MQA (g = 1) included. Every rank's gradients are
merged with the converter's rules and compared with TP1's; the merged full weights must equal
TP1's too (same draws), and the shards must hold each element once (sum of numels).
"""

from __future__ import annotations

import pytest
import torch

from mtnlg.config import ModelConfig
from tests.helpers.dist import run_distributed

LLAMA = dict(
    num_layers=2, hidden_size=64, num_attention_heads=8, seq_length=16, vocab_size=300,
    ffn_hidden_size=96, position_embedding_type="rope", normalization="rmsnorm", swiglu=True,
    untie_embeddings_and_output_weights=True, add_bias_linear=False, add_qkv_bias=True,
    hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip


def _cfg(groups: int) -> ModelConfig:
    return ModelConfig(**LLAMA, num_query_groups=groups)


def _step(cfg: ModelConfig, tp_group) -> tuple[float, dict, dict, dict]:
    """loss, {name: local grad}, {name: local weight}, {name: numel} of one forward/backward."""
    from mtnlg.checkpoint import rules
    from mtnlg.model.gpt import GPTModel

    tp = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
    model = GPTModel(cfg, tp_group, seed=7)
    for name, p in model.named_parameters():  # biases and norms away from their init values
        if p.dim() == 1:
            gen = torch.Generator().manual_seed(3)
            full = 1.0 + 0.1 * torch.randn(rules.full_shape(name, cfg), generator=gen)
            with torch.no_grad():
                p.copy_(rules.shard_tensor(name, full, cfg, tp, rank))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=g)
    loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return loss.item(), grads, weights, {n: p.numel() for n, p in model.named_parameters()}


def _tp_body(rank, world_size, groups):
    import torch.distributed as dist

    return _step(_cfg(groups), dist.group.WORLD)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "tp,groups", [(2, 2), (4, 2), (2, 1)], ids=["split-groups", "shared-groups", "mqa"]
)
def test_gqa_tp_matches_tp1(tp, groups):
    from mtnlg.checkpoint import rules

    cfg = _cfg(groups)
    ref_loss, ref_grads, ref_weights, ref_numel = _step(cfg, None)
    results = run_distributed(_tp_body, tp, args=(groups,), timeout=240, start_method="forkserver")
    for loss, *_ in results:
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for name in ref_grads:
        full = rules.shard_tensor(name, ref_weights[name], cfg, 1, 0)
        grads = [r[1][name] for r in results]
        weights = [r[2][name] for r in results]
        merged_w = rules.merge_tensor(name, weights, cfg)
        merged_g = rules.merge_tensor(name, grads, cfg, check=False)
        if rules.tp_kind(name) == "vocab":
            full, ref_g = full[: cfg.vocab_size], ref_grads[name][: cfg.vocab_size]
        else:
            ref_g = ref_grads[name]
        assert torch.equal(merged_w, full), name
        torch.testing.assert_close(merged_g, ref_g, rtol=1e-4, atol=1e-6, msg=name)
        if "qkv" in name:  # every element on exactly one rank
            assert sum(r[3][name] for r in results) == ref_numel[name], name
