"""On a trained model, pruning by the calibration scores keeps a lower perplexity (before any
retraining) than pruning the same shape at random: the scores carry signal.

"At random" is the mean held-out perplexity over five random rankings (an expectation, not one
draw: on a 4 x 64 model single draws scatter widely, e.g. 366 to 602 for one target). Ranking
by the reversed scores is far worse than both, on every target."""

from __future__ import annotations

import math

import pytest
import torch

from tests.e2e.test_pretrain import base_args
from tests.helpers.dist import run_distributed

RANDOM_SEEDS = (1, 2, 3, 4, 5)


def _pretrain(rank, world, argv):
    from mtnlg.training.pretrain import run

    run(argv)


def _prune_py(rank, world, argv):
    from mtnlg.compression.run import run

    run(argv)


@pytest.fixture(scope="module")
def trained(demo_prefix, tmp_path_factory):
    """GPT 4 x 64 trained 700 steps on the demo corpus (held-out perplexity ~117), and its
    scores from 64 training samples."""
    d = tmp_path_factory.mktemp("trained")
    argv = base_args(demo_prefix, iters=700, gb=16, mb=16)
    argv += ["--save", str(d / "ckpt"), "--save-interval", "700", "--eval-interval", "0",
             "--lr", "6e-3", "--ffn-hidden-size", "256"]  # fmt: skip
    run_distributed(_pretrain, 1, args=(argv,), timeout=600, start_method="forkserver")
    scores = d / "scores.safetensors"
    argv = ["--load", str(d / "ckpt"), "--calib-data", demo_prefix, "--calib-samples", "64",
            "--split", "90,10,0", "--scores-out", str(scores), "--no-progress"]  # fmt: skip
    run_distributed(_prune_py, 1, args=(argv,), timeout=300, start_method="forkserver")
    return {"dir": d, "ckpt": d / "ckpt", "scores": scores, "prefix": demo_prefix}


def held_out_ppl(path, prefix: str) -> float:
    """Perplexity of a checkpoint on 32 validation samples (not the calibration ones)."""
    from mtnlg.checkpoint import load_full_state, load_into_model
    from mtnlg.evaluation.perplexity import dataset_windows
    from mtnlg.model import GPTModel
    from mtnlg.tensor_parallel import skip_init

    cfg, full, _ = load_full_state(path)
    with skip_init():
        model = GPTModel(cfg)
    load_into_model(model, full, 1, 0)
    windows = dataset_windows([prefix], "90,10,0", cfg.seq_length, 1234, 32)
    x = torch.as_tensor(torch.stack([torch.as_tensor(w) for w in windows]))
    with torch.no_grad():
        loss = model.eval()(x[:, :-1], x[:, 1:])
    return math.exp(float(loss))


def _ppl_after(trained, scores, tmp_path, name, **spec) -> float:
    from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint
    from mtnlg.compression.pruning import prune_checkpoint
    from mtnlg.compression.targets import PruneSpec, resolve_target

    cfg = DSCheckpoint(trained["ckpt"]).cfg
    target = resolve_target(PruneSpec(**spec), cfg, scores, 1, 1)
    prune_checkpoint(trained["ckpt"], tmp_path / name, target, 1, 1)
    return held_out_ppl(tmp_path / name, trained["prefix"])


def _random_scores(like: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in like.items()}


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "spec",
    [
        {"ffn_hidden_size": 64, "num_attention_heads": 2, "hidden_size": 48},
        {"ffn_hidden_size": 64, "num_attention_heads": 2},
        {"num_layers": 3},
    ],
    ids=["width", "neurons+heads", "depth"],
)
def test_scores_beat_random(trained, tmp_path, spec):
    from mtnlg.compression.scores import load_scores

    scores = load_scores(trained["scores"])[0]
    base = held_out_ppl(trained["ckpt"], trained["prefix"])
    ours = _ppl_after(trained, scores, tmp_path, "ours", **spec)
    anti = _ppl_after(trained, {k: -v for k, v in scores.items()}, tmp_path, "anti", **spec)
    rand = [
        _ppl_after(trained, _random_scores(scores, s), tmp_path, f"r{s}", **spec)
        for s in RANDOM_SEEDS
    ]
    mean = sum(rand) / len(rand)
    print(f"{spec}: unpruned {base:.1f}, by scores {ours:.1f}, reversed {anti:.1f}, at random "
          f"{mean:.1f} (draws {[round(r, 1) for r in rand]})")  # fmt: skip
    assert base < ours < mean < anti, (base, ours, rand, anti)
