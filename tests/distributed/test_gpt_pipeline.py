"""The DeepSpeed pipeline form, trained with the real engine, against the plain TP=1 model.

Reference: ``GPTModel`` at TP=PP=1 trained with ``torch.optim.AdamW`` and
``clip_grad_norm_`` on the same micro-batches (gradient accumulation by summing loss/gas).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.gpt_helpers import batches, tiny_config
from tests.helpers.dist import run_distributed

SEED = 4321
STEPS, GAS, MICRO = 5, 2, 2
LR, BETAS, EPS, WD, CLIP = 3e-3, (0.9, 0.95), 1e-8, 0.1, 1.0


def _cfg():
    return tiny_config(num_layers=4)


def _ds_config(dp: int) -> dict:
    return {
        "train_batch_size": MICRO * GAS * dp,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": LR,
                "betas": list(BETAS),
                "eps": EPS,
                "weight_decay": WD,
                "torch_adam": True,
            },
        },
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _pipe_train(rank, world_size, tp, pp):
    import deepspeed

    from mtnlg.distributed import ParallelDims, Topology
    from mtnlg.model.pipe import GPTPipe
    from mtnlg.tensor_parallel.random import model_parallel_seed

    topo = Topology(ParallelDims(world_size=world_size, tp=tp, pp=pp))
    cfg = _cfg()
    model = GPTPipe(cfg, topo, seed=SEED)
    model_parallel_seed(SEED, tp_rank=topo.tp_rank, pp_rank=topo.pp_rank)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=_ds_config(topo.dp),
    )
    data = batches(cfg, STEPS * GAS, MICRO, seed=99)
    losses = []
    for step in range(STEPS):
        it = iter(data[(step % 2) * GAS : (step % 2 + 1) * GAS])
        losses.append(float(engine.train_batch(data_iter=it)))
    tied = None
    if topo.is_first_stage or topo.is_last_stage:
        tied = model.tied_modules["embed"].word_embeddings.weight.detach().clone()
    return {"losses": losses, "tied": tied, "pp_rank": topo.pp_rank, "tp_rank": topo.tp_rank}


def _reference_losses() -> list[float]:
    from mtnlg.model import GPTModel

    cfg = _cfg()
    model = GPTModel(cfg, seed=SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    data = batches(cfg, STEPS * GAS, MICRO, seed=99)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for ids, labels in data[(step % 2) * GAS : (step % 2 + 1) * GAS]:
            loss = model(ids, labels) / GAS
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


@pytest.mark.timeout(400)
# PP2 alone is covered by TP2xPP2 (same code path plus TP); kept for `make test-all`
@pytest.mark.parametrize("tp,pp", [pytest.param(1, 2, marks=pytest.mark.slow), (2, 2)])
def test_pipeline_engine_matches_plain_model(tp, pp):
    ref = _reference_losses()
    results = run_distributed(
        _pipe_train, world_size=tp * pp, args=(tp, pp), timeout=360, start_method="forkserver"
    )
    for r in results:
        assert r["losses"] == pytest.approx(ref, rel=1e-4), (r["pp_rank"], r["tp_rank"])
    assert ref[-1] < ref[0]  # it trained
    # tied embedding: the first-stage and last-stage copies are still identical
    for t in range(tp):
        copies = [r["tied"] for r in results if r["tp_rank"] == t and r["tied"] is not None]
        assert len(copies) == 2
        torch.testing.assert_close(copies[0], copies[1], rtol=0, atol=0)
