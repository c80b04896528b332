"""The last pipeline stage's tied head builds only the word table (no unused position table).

Expected counts are written out from the config (GPT block: 12h^2 + 13h; LayerNorm 2h; word
table padded to a multiple of ``make_vocab_size_divisible_by``), not taken from the planner or
the model. The previous layout (the whole ``GPTEmbedding`` as the head) is built through
``GPTPipe(head=...)`` for comparison.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.gpt_helpers import batches, tiny_config
from tests.helpers.dist import run_distributed


def _cfgs():
    # 4 blocks (2 per stage at PP=2); learned positions, and RoPE (no table either way)
    return {
        "gpt": tiny_config(num_layers=4),
        "rope": tiny_config(num_layers=4, position_embedding_type="rope"),
    }


def _legacy_head(cfg, tp_group):
    from deepspeed.pipe import TiedLayerSpec

    from mtnlg.model.layers import GPTEmbedding
    from mtnlg.model.pipe import _lm_head

    return TiedLayerSpec(
        "embed", GPTEmbedding, cfg, tp_group, forward_fn=_lm_head,
        tied_weight_attr="word_embeddings.weight",
    )  # fmt: skip


def _stage_step(model, cfg, first: bool) -> list[str]:
    """One forward/backward of this stage's layers; names of parameters left without a grad."""
    ids, labels = batches(cfg, 1, 2, seed=3)[0]
    if first:
        out = model(ids)
        out.square().mean().backward()  # (b, s, h) hidden state: any scalar of it
    else:
        hidden = torch.randn(2, cfg.seq_length, cfg.hidden_size, generator=torch.Generator())
        model.loss_fn(model(hidden), labels).backward()
    return [n for n, p in model.named_parameters() if p.grad is None]


def _stage_step_single(model, cfg) -> list[str]:
    ids, labels = batches(cfg, 1, 2, seed=3)[0]
    model.loss_fn(model(ids), labels).backward()
    return [n for n, p in model.named_parameters() if p.grad is None]


def _build(rank, world_size):
    from mtnlg.distributed import ParallelDims, Topology
    from mtnlg.model.pipe import GPTPipe

    pp2 = Topology(ParallelDims(world_size=world_size, tp=1, pp=2))
    one = Topology(ParallelDims(world_size=world_size, tp=1, pp=1))  # DP2, one stage
    out = {}
    for name, cfg in _cfgs().items():
        new = GPTPipe(cfg, pp2, seed=5)
        old = GPTPipe(cfg, pp2, seed=5, head=_legacy_head(cfg, None))
        single = GPTPipe(cfg, one, seed=5)
        emb = single.tied_modules["embed"]
        out[name] = {
            "new": sum(p.numel() for p in new.parameters()),
            "old": sum(p.numel() for p in old.parameters()),
            "no_grad": _stage_step(new, cfg, pp2.is_first_stage),
            "old_no_grad": _stage_step(old, cfg, pp2.is_first_stage),
            "single": sum(p.numel() for p in single.parameters()),
            "single_positions": emb.position_embeddings is not None,
            "single_no_grad": _stage_step_single(single, cfg),
        }
    return out


@pytest.mark.timeout(300)
def test_last_stage_holds_only_the_word_table():
    got = run_distributed(_build, 2, timeout=240)
    for name, cfg in _cfgs().items():
        h, L = cfg.hidden_size, cfg.num_layers
        words = -(-cfg.vocab_size // cfg.make_vocab_size_divisible_by)
        words *= cfg.make_vocab_size_divisible_by * h
        positions = 0 if cfg.use_rope else cfg.max_position_embeddings * h  # RoPE: no table
        block = 12 * h * h + 13 * h
        first, last = got[0][name], got[1][name]
        assert first["new"] == words + positions + (L // 2) * block
        assert last["new"] == words + (L // 2) * block + 2 * h  # + final LayerNorm
        assert last["old"] - last["new"] == positions  # the unused table, gone
        assert first["old"] == first["new"]
        assert first["no_grad"] == last["no_grad"] == []
        if positions:  # the old head's table never got a gradient: the test can fail
            assert last["old_no_grad"] == ["tied_modules.embed.position_embeddings.weight"]
        # one stage: one embedding used both ways, position table kept
        for r in (0, 1):
            s = got[r][name]
            assert s["single"] == words + positions + L * block + 2 * h
            assert s["single_positions"] == (positions > 0)
            assert s["single_no_grad"] == []
