"""Fine-tuning reads its examples on the first and last pipeline stages only.

A PP=3 classification run (3 spawned ranks, 4 micro-batches of 2) counts, per rank, the reads
of the training examples (``task.train[i]``): the middle stage makes none, the first and last
read each step's 8 samples, and the losses equal a one-process run with one micro-batch of 8
(the pretraining equivalence tolerance, 1e-6 relative).
"""

from __future__ import annotations

import pytest

from tests.e2e.pretrain_runs import max_rel, read_metrics
from tests.finetuning.ft_runs import classification_args, finetune, sst2_sample
from tests.helpers.dist import run_distributed

ITERS = 3


class _CountedList(list):
    reads = 0

    def __getitem__(self, i):
        type(self).reads += 1
        return super().__getitem__(i)


def _counted_body(rank, world_size, argv):
    import mtnlg.finetuning.run as ft_run

    def counted(engine, topo, task, *args, _finetune=ft_run.finetune, **kwargs):
        task.train = _CountedList(task.train)
        return _finetune(engine, topo, task, *args, **kwargs)

    ft_run.finetune = counted
    ft_run.run(argv)
    return _CountedList.reads


@pytest.mark.timeout(600)
def test_pp3_middle_stage_reads_no_examples(tmp_path):
    train, dev = sst2_sample(tmp_path, "train", 24), sst2_sample(tmp_path, "dev", 8)
    ref, _ = finetune(classification_args(train, dev, mb=8, iters=ITERS), 1, tmp_path / "ref")
    metrics = tmp_path / "pp3.jsonl"
    argv = [*classification_args(train, dev, pp=3, iters=ITERS), "--metrics-file", str(metrics)]
    reads = run_distributed(
        _counted_body, world_size=3, args=(argv,), timeout=400, start_method="forkserver"
    )
    assert reads == [8 * ITERS, 0, 8 * ITERS]  # stages 0, 1, 2 (one rank each)
    losses, norms = read_metrics(metrics)
    assert len(losses) == ITERS
    assert max_rel(losses, ref.losses) < 1e-6
    assert max_rel(norms, ref.grad_norms) < 1e-6
