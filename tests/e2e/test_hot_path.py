"""The training loop's hot path at PP=3: host syncs only at ``--log-interval``, data read only on
the first and last pipeline stages (one step ahead, on the loader's thread), same losses.

Inside the spawned ranks the real code runs unchanged; the test only wraps it to count:
``torch.Tensor``'s host-reading methods (``item``, ``tolist``, ``float()``, ``bool()``, ...) when
called from ``mtnlg`` code, tagged with the number of optimizer steps started so far (a wrapper
around ``mtnlg.training.steps.step_loss``), and ``GPTDataset.__getitem__`` with the reading thread.
The losses are compared with a TP1 x PP1 x DP1 run of the same seed and data with one micro-batch
of 8 (no pipeline, no accumulation: the independent reference of ``test_equivalence.py``).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT
from tests.e2e.pretrain_runs import equivalence_args, max_rel
from tests.helpers.dist import run_distributed

ITERS, LOG, GB = 6, 3, 8
EVAL_ITERS = 2
EVALS = ITERS // LOG  # evaluation every LOG iterations
SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")
MAX_SYNCS_PER_LOG = 3
"""The loss window, the gradient norm and the evaluation's mean loss."""


def _observed(rank, world_size, argv):
    """Spawned body: pretraining with the counters described in the module docstring."""
    import threading

    import torch

    from mtnlg.data.gpt_dataset import GPTDataset
    from mtnlg.training import steps as step_module
    from mtnlg.training.pretrain import run

    mtnlg_dir, torch_dir = str(ROOT / "mtnlg"), str(Path(torch.__file__).parent)
    steps, syncs, reads = [0], [], Counter()

    def counted(name, fn):
        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(torch_dir):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(mtnlg_dir):
                where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
                syncs.append((steps[0], f"{name} {where}"))
            return fn(self, *args, **kwargs)

        return wrapper

    def counted_step(*args, _step=step_module.step_loss):
        steps[0] += 1
        return _step(*args)

    def counted_read(self, idx, _get=GPTDataset.__getitem__):
        reads[threading.current_thread().name] += 1
        return _get(self, idx)

    saved = {n: getattr(torch.Tensor, n) for n in SYNC_METHODS}
    for name, fn in saved.items():
        setattr(torch.Tensor, name, counted(name, fn))
    step_module.step_loss, GPTDataset.__getitem__ = counted_step, counted_read
    try:
        progress = run(argv)
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
    return [loss for _, loss in progress.losses], syncs, dict(reads)


def _args(prefix: str, pp: int, mb: int, metrics: Path) -> list[str]:
    return equivalence_args(
        prefix,
        pp=pp,
        mb=mb,
        iters=ITERS,
        extra=[
            "--log-interval",
            str(LOG),
            "--eval-interval",
            str(LOG),
            "--eval-iters",
            str(EVAL_ITERS),
            "--metrics-file",
            str(metrics),
        ],
    )


def _rows(path: Path, kind: str) -> list[dict]:
    from mtnlg.training.metrics import read_metrics

    return read_metrics(str(path), kind)


@pytest.fixture(scope="module")
def runs(demo_prefix, tmp_path_factory):
    out = tmp_path_factory.mktemp("hot_path")
    pp3 = run_distributed(
        _observed,
        3,
        args=(_args(demo_prefix, 3, 2, out / "pp3.jsonl"),),
        timeout=400,
        start_method="forkserver",
    )
    ref = run_distributed(
        _observed,
        1,
        args=(_args(demo_prefix, 1, 8, out / "ref.jsonl"),),
        timeout=300,
        start_method="forkserver",
    )
    return {"pp3": pp3, "ref": ref[0], "out": out}


@pytest.mark.timeout(800)
def test_pp3_losses_equal_the_reference(runs):
    ref_losses = runs["ref"][0]
    assert len(ref_losses) == ITERS
    for losses, _, _ in runs["pp3"]:
        assert losses == runs["pp3"][0][0], "ranks disagree on the loss"
    assert max_rel(runs["pp3"][0][0], ref_losses) <= 1e-6, (runs["pp3"][0][0], ref_losses)
    out = runs["out"]
    # the JSON Lines rows carry the very values of progress.losses, at the log iterations
    train = _rows(out / "pp3.jsonl", "train")
    assert [r["iteration"] for r in train] == list(range(LOG, ITERS + 1, LOG))
    assert [r["loss"] for r in train] == runs["pp3"][0][0][LOG - 1 :: LOG]
    assert all(r["grad_norm"] > 0 for r in train)
    got = [r["val_loss"] for r in _rows(out / "pp3.jsonl", "eval")]
    want = [r["val_loss"] for r in _rows(out / "ref.jsonl", "eval")]
    assert len(got) == EVALS and max_rel(got, want) <= 1e-6, (got, want)


@pytest.mark.timeout(800)
def test_host_syncs_only_at_log_intervals(runs):
    """Per rank, ``mtnlg`` reads device values back only in the steps that log (every LOG-th),
    at most ``MAX_SYNCS_PER_LOG`` times there: syncs scale with ITERS / LOG, not ITERS."""
    for _, syncs, _ in [*runs["pp3"], runs["ref"]]:
        per_step = Counter(step for step, _ in syncs)
        assert set(per_step) == set(range(LOG, ITERS + 1, LOG)), syncs
        assert max(per_step.values()) <= MAX_SYNCS_PER_LOG, syncs


@pytest.mark.timeout(800)
def test_only_first_and_last_stage_read_data_ahead(runs):
    """The middle stage never reads a sample; the others read each sample they use once, all
    but the first batch of each run of batches (training, each evaluation) on the loader's
    thread, built while the previous step ran."""
    (_, _, first), (_, _, middle), (_, _, last) = runs["pp3"]
    assert middle == {}
    total = ITERS * GB + EVALS * EVAL_ITERS * GB
    ahead = (ITERS - 1) * GB + EVALS * (EVAL_ITERS - 1) * GB
    for reads in (first, last, runs["ref"][2]):
        assert sum(reads.values()) == total, reads
        assert reads.get("mtnlg-data_0", 0) == ahead, reads
