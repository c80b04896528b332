"""Checkpoints saved before the last stage's tied head dropped its position table.

Such a checkpoint (PP=2, ZeRO-1) holds the table in the last stage's optimizer groups. It is
made here by the previous layout (the whole ``GPTEmbedding`` as the head, built through
``GPTPipe(head=...)``), trained straight through: the reference. The new model must resume it
with the optimizer state (read around the dropped table, logged) and continue exactly as the
reference did; the converter's reshard must carry it into the new layout. Without ZeRO the
state is refused with the way out named.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from tests.e2e.test_checkpoints_dp import at_tag
from tests.e2e.test_pretrain import base_args
from tests.helpers.dist import run_distributed

ITERS, HALF = 4, 2
TAG = f"iter_{HALF:07d}"
TABLE = "tied_modules.embed.position_embeddings.weight"


def _legacy_layout():
    """GPTPipe builds its last stage's head as the previous code did (the whole embedding)."""
    import mtnlg.model.pipe as pipe

    real = pipe.gpt_layer_specs

    def specs(cfg, tp_group=None):
        out = real(cfg, tp_group)
        out[-1].module_kwargs.pop("head_only", None)
        return out

    return specs


def _jobs(rank, world_size, jobs):
    import torch.distributed as dist

    import mtnlg.model.pipe as pipe
    from mtnlg.checkpoint.convert import reshard
    from mtnlg.training import pretrain
    from mtnlg.training.arguments import build_parser

    real = pipe.gpt_layer_specs
    out = []
    for kind, arg in jobs:
        if kind in ("reshard", "link"):
            if rank == 0:
                reshard(**arg) if kind == "reshard" else at_tag(*arg)
            dist.barrier()
            out.append(None)
            continue
        pipe.gpt_layer_specs = _legacy_layout() if kind == "legacy" else real
        text = io.StringIO()
        try:
            with contextlib.redirect_stdout(text):
                progress = pretrain._run(build_parser("train").parse_args(arg))
            out.append(([loss for _, loss in progress.losses], text.getvalue()))
        except SystemExit as e:
            out.append((None, str(e.code)))
        finally:
            pipe.gpt_layer_specs = real
    return out


def _shapes(ckpt_dir, mp: int) -> list[str]:
    from mtnlg.checkpoint.deepspeed_layout import model_file, safe_load

    return [n for g in safe_load(model_file(ckpt_dir, mp))["param_shapes"] for n in g]


def _args(prefix, extra, iters=ITERS):
    """The LR decays over ITERS whatever ``iters`` (a --load refuses another schedule)."""
    decay = ["--lr-decay-iters", str(ITERS)]
    return base_args(prefix, pp=2, iters=iters, extra=[*decay, *extra])


@pytest.fixture(scope="module")
def runs(demo_prefix, tmp_path_factory):
    """The previous layout trained straight (saving at HALF), and the new model resuming it:
    one process group."""
    t = tmp_path_factory.mktemp("tiedhead")
    old, half = t / "old", t / "half"
    jobs = [
        ("legacy", _args(demo_prefix, ["--save", str(old), "--save-interval", str(HALF)])),
        ("link", (old, TAG, half)),
        ("train", _args(demo_prefix, ["--load", str(half)])),
    ]
    ref, _, resumed = run_distributed(_jobs, 2, args=(jobs,), timeout=300)[0]
    return {"t": t, "old": old, "ref": ref[0], "resumed": resumed}


@pytest.fixture(scope="module")
def more_runs(runs, demo_prefix):
    """The converter's copy of the old checkpoint resumed; an old checkpoint without ZeRO."""
    t, z0 = runs["t"], runs["t"] / "old_z0"
    jobs = [
        ("reshard", dict(input=str(runs["old"]), output=str(t / "new"), tp=1, pp=2, tag=TAG)),
        ("train", _args(demo_prefix, ["--load", str(t / "new")])),
        ("legacy", _args(demo_prefix, ["--zero-stage", "0", "--save", str(z0)], HALF)),
        ("train", _args(demo_prefix, ["--zero-stage", "0", "--load", str(z0)])),
    ]
    out = run_distributed(_jobs, 2, args=(jobs,), timeout=400)[0]
    return {"new": t / "new" / TAG, "resharded": out[1], "z0": out[3]}


@pytest.mark.timeout(600)
def test_old_checkpoint_resumes_exactly_with_its_optimizer_state(runs):
    ref, (resumed, log) = runs["ref"], runs["resumed"]
    assert TABLE in _shapes(runs["old"] / TAG, 1)  # the previous layout: the table is there
    assert len(ref) == ITERS and len(resumed) == ITERS - HALF
    torch.testing.assert_close(resumed, ref[HALF:], rtol=0, atol=1e-5)
    assert f"dropped the saved optimizer state of ['{TABLE}']" in log


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reshard_writes_the_new_layout(runs, more_runs):
    assert TABLE not in _shapes(more_runs["new"], 1)  # mp rank 1: the last stage (TP1)
    resumed, log = more_runs["resharded"]
    torch.testing.assert_close(resumed, runs["ref"][HALF:], rtol=0, atol=1e-5)
    assert "dropped" not in log


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_without_zero_the_old_state_is_refused(more_runs):
    losses, msg = more_runs["z0"]
    assert losses is None
    assert "position table" in msg and "--weights-only" in msg and "old_z0" in msg
