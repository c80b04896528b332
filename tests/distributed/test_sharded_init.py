"""Models whose weights follow (resume, fine-tuning start, teacher, inference) are built inside
``skip_init()``: each rank allocates only its own shards and draws nothing.

Peak resident memory of building a TP2 GPT is measured on each rank at two hidden sizes, so
slope and constant separate. Both builds then write every parameter once (as a load does).
With ``skip_init`` the growth between the sizes matches the growth of the rank's own parameter
bytes (O(shard)); a random init also holds a full fp32 master of each tensor while it draws.
"""

from __future__ import annotations

import pytest

from tests.helpers.dist import run_distributed

SIZES = (512, 1024)


def _cfg(h: int):
    from mtnlg.config import ModelConfig

    return ModelConfig(
        num_layers=4, hidden_size=h, num_attention_heads=8, seq_length=32, vocab_size=8000,
        hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip


def _peak_mb() -> float:
    """This process's resident high-water mark (VmHWM: per address space, so a spawned rank
    does not inherit the parent's, as ``ru_maxrss`` can across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _build(rank, world_size, skip: bool):
    import gc
    from contextlib import nullcontext

    import torch.distributed as dist

    from mtnlg.model.gpt import GPTModel
    from mtnlg.tensor_parallel import skip_init

    out, base = [], _peak_mb()
    for h in SIZES:  # smaller first: the high-water mark only grows
        with skip_init() if skip else nullcontext():
            model = GPTModel(_cfg(h), tp_group=dist.group.WORLD, seed=1)
        for p in model.parameters():  # what a load does: every shard's pages written once
            p.data.fill_(0.5)
        shard_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        out.append((h, _peak_mb() - base, shard_mb))
        del model
        gc.collect()
    return out


@pytest.mark.timeout(300)
def test_skip_init_peak_memory_is_the_shard():
    skip = run_distributed(_build, 2, args=(True,), timeout=240)
    full = run_distributed(_build, 2, args=(False,), timeout=240)
    for rank in range(2):
        (h1, s1, shard1), (h2, s2, shard2) = skip[rank]
        (_, f1, _), (_, f2, _) = full[rank]
        shard_slope = shard2 - shard1
        # O(shard): the peak grows like the rank's own parameters (fp32), not like the model
        assert 0.8 * shard_slope <= s2 - s1 <= 1.25 * shard_slope, (skip[rank], shard_slope)
        # drawing full masters costs more at the large size (transient full tensors)
        assert f2 > s2, (full[rank], skip[rank])
