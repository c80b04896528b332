"""Checkpoints at DP > 1 through DeepSpeed: exact resume, reshard with optimizer state, DP-elastic
``--load``, bf16 (BF16_Optimizer) state carried, ZeRO-2/3 resume, refusals.

The reference for every continuation is the uninterrupted run of the same seed and data: the
global batch never changes, so a resume at another layout computes the same function up to fp32
reduction order (1e-4; fp32, dropout off). A weights-only resume (fresh Adam moments) misses it by
far (second step after the resume: 8.3206 instead of 8.2992, measured at TP1 with these flags), so
the tests cannot pass without the optimizer state.
Runs are shared: one process group per world size runs several drivers in a row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.e2e.test_pretrain import base_args
from tests.helpers.dist import run_distributed

ITERS, HALF = 4, 2
TAG = f"iter_{HALF:07d}"


def _jobs(rank, world_size, jobs):
    """Run pretrain drivers and (on rank 0, then a barrier) reshards in one process group."""
    import torch.distributed as dist

    from mtnlg.checkpoint.convert import reshard
    from mtnlg.training import pretrain
    from mtnlg.training.arguments import build_parser

    out = []
    for kind, arg in jobs:
        if kind == "reshard":
            if rank == 0:
                reshard(**arg)
            dist.barrier()
            out.append(None)
        else:
            progress = pretrain._run(build_parser("train").parse_args(arg))
            out.append([loss for _, loss in progress.losses])
    return out


def run(jobs, world_size, timeout=600):
    return run_distributed(
        _jobs, world_size, args=(jobs,), timeout=timeout, start_method="forkserver"
    )[0]


def at_tag(root: Path, tag: str, view: Path) -> str:
    """A checkpoint root whose ``latest`` is ``tag`` of ``root`` (the tag folder linked)."""
    view.mkdir()
    (view / tag).symlink_to((root / tag).resolve())
    (view / "latest").write_text(tag + "\n")
    return str(view)


def args(prefix, tp, pp, extra=(), iters=ITERS):
    """The LR decays over ITERS whatever ``iters``: a run of HALF that only loads and saves
    again has the saved run's schedule (a --load refuses another)."""
    decay = ["--lr-decay-iters", str(ITERS)]
    return base_args(prefix, tp=tp, pp=pp, iters=iters, extra=[*decay, *extra])


def optimizer_state(path: str):
    """Full (TP=1) fp32 master weights and Adam moments of every tensor, and the Adam step."""
    from mtnlg.checkpoint import rules
    from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint

    ck = DSCheckpoint(path)
    assert ck.has_optimizer, path
    state = {}
    for group in rules.layer_groups(ck.cfg):
        for kind, tensors in ck.optimizer_group(group).items():
            state.update({(kind, n): t for n, t in tensors.items()})
    step = ck.optimizer_common()["template"]["base_optimizer_state"]["state"][0]["step"]
    return state, float(step)


def assert_same_state(a: str, b: str) -> None:
    sa, step_a = optimizer_state(a)
    sb, step_b = optimizer_state(b)
    assert step_a == step_b == HALF
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def runs(demo_prefix, tmp_path_factory):
    """Every run of this module; the assertions below read from it."""
    t = tmp_path_factory.mktemp("ckdp")
    p = demo_prefix
    ck, bf = t / "c222", t / "bf"
    save = ["--save-interval", str(HALF)]
    bf16 = ["--bf16", "--zero-stage", "1"]
    r = {}
    # bf16 ZeRO-1 at TP1 x PP2 x DP2: --bf16 alone gives BF16_Optimizer (fp32 accumulation)
    r["bf_straight"] = run([("train", args(p, 1, 2, [*bf16, "--save", str(bf), *save]))], 4)[0]
    bf_half = at_tag(bf, TAG, t / "bf_half")
    r["bf_dir"] = bf
    # fp32 ZeRO-1 at TP2 x PP2 x DP2 (8 processes) and what continues it
    resharded = {k: str(t / f"r{k}") for k in ("111", "412")}
    jobs = [
        ("train", args(p, 2, 2, ["--save", str(ck), *save])),
        ("reshard", dict(input=str(ck), output=resharded["111"], tp=1, pp=1, dp=1, tag=TAG)),
        ("reshard", dict(input=str(ck), output=resharded["412"], tp=4, pp=1, dp=2, tag=TAG)),
        ("train", args(p, 2, 2, ["--load", at_tag(ck, TAG, t / "half")])),
        ("train", args(p, 4, 1, ["--load", resharded["412"]])),
        # DP-elastic, larger: bf16 saved at DP2 loaded at DP4 (same TP x PP)
        ("train", args(p, 1, 2, [*bf16, "--load", bf_half])),
        # load at the saved iteration and save again: DeepSpeed's view of the state we wrote
        ("train", args(p, 1, 2, [*bf16, "--load", bf_half, "--save", str(t / "bf_dp4")], HALF)),
    ]
    out = run(jobs, 8)
    r["straight"], r["resumed"], r["r412"], r["bf_dp4"] = out[0], out[3], out[4], out[5]
    r["ck"], r["t"], r["resharded"] = ck, t, resharded
    # DP-elastic, smaller: TP2 x PP2 saved at DP2 loaded at DP1
    r["dp1"] = run([("train", args(p, 2, 2, ["--load", str(t / "half")]))], 4)[0]
    # bf16 resharded to TP2 x PP1 x DP1 (optimizer state in the BF16_Optimizer format), resumed;
    # ZeRO-2/3 resume at DP2
    bf_r = str(t / "bf_r211")
    jobs = [
        ("reshard", dict(input=str(bf), output=bf_r, tp=2, pp=1, dp=1, tag=TAG)),
        ("train", args(p, 2, 1, [*bf16, "--load", bf_r])),
        ("train", args(p, 2, 1, [*bf16, "--load", bf_r, "--save", str(t / "bf_r_back")], HALF)),
    ]
    for z in (2, 3):
        zd = str(t / f"z{z}")
        jobs += [
            ("train", args(p, 1, 1, ["--zero-stage", str(z), "--save", zd, *save])),
            (
                "train",
                args(
                    p, 1, 1, ["--zero-stage", str(z), "--load", at_tag(Path(zd), TAG, t / f"z{z}h")]
                ),
            ),
        ]
    out = run(jobs, 2)
    r["bf_r211"], r["z2"], r["z2_resumed"], r["z3"], r["z3_resumed"] = (
        out[1],
        out[3],
        out[4],
        out[5],
        out[6],
    )
    r["bf_r"] = bf_r
    z0 = str(t / "z0")
    jobs = [
        ("train", args(p, 1, 1, ["--load", resharded["111"]])),
        ("train", args(p, 1, 1, ["--zero-stage", "2", "--load", str(t / "z2h")])),  # DP2 -> DP1
        ("train", args(p, 1, 1, ["--zero-stage", "0", "--save", z0], HALF)),
    ]
    out = run(jobs, 1)
    r["r111"], r["z2_dp1"], r["z0"] = out[0], out[1], z0
    return r


@pytest.mark.timeout(900)
def test_tp2_pp2_dp2_resume_is_exact(runs):
    assert len(runs["straight"]) == ITERS
    assert runs["resumed"] == runs["straight"][HALF:]  # bit for bit


@pytest.mark.timeout(900)
def test_reshard_with_optimizer_state_continues(runs):
    for key in ("r111", "r412"):
        meta = json.loads((Path(runs["resharded"][key[1:]]) / TAG / "mtnlg_meta.json").read_text())
        assert meta["weights_only"] is False
        assert runs[key] == pytest.approx(runs["straight"][HALF:], rel=1e-4), key


@pytest.mark.timeout(900)
def test_dp_elastic_load_continues(runs):
    """Saved at DP2, loaded at DP1 (fp32, TP2 x PP2) and at DP4 (bf16, TP1 x PP2)."""
    assert runs["dp1"] == pytest.approx(runs["straight"][HALF:], rel=1e-4)
    assert runs["z2_dp1"] == pytest.approx(runs["z2"][HALF:], rel=1e-4)  # ZeRO-2 too
    # bf16: same weights and fp32 masters; the fp32 gradient sum is reordered, and the step's new
    # masters are rounded to bf16 weights, so a rounding can flip: 1e-3 (measured 6e-5; a fresh
    # optimizer is off by 2e-2 after one step)
    assert runs["bf_dp4"] == pytest.approx(runs["bf_straight"][HALF:], abs=1e-3)
    # DeepSpeed at DP4 saved exactly the state it was given from DP2
    assert_same_state(str(runs["bf_dir"] / TAG), str(runs["t"] / "bf_dp4"))


@pytest.mark.timeout(900)
def test_bf16_optimizer_state_through_reshard(runs):
    from mtnlg.checkpoint import zero_state
    from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint, safe_load

    src = DSCheckpoint(runs["bf_dir"], TAG)
    assert src.optim_prefix == "bf16_zero"
    osd = safe_load(src.dir / zero_state.optim_name("bf16_zero", 0, 0))["optimizer_state_dict"]
    assert not zero_state.is_zero_format(osd)  # BF16_Optimizer's format: fp32 accumulation
    out = DSCheckpoint(runs["bf_r"])
    assert out.has_optimizer and out.optim_prefix == "bf16_zero" and not out.meta["weights_only"]
    assert out.weights_dtype == torch.bfloat16
    # DeepSpeed loaded the resharded state at TP2 x PP1 and saved it back unchanged
    assert_same_state(str(src.dir), str(runs["t"] / "bf_r_back"))
    # resumed at another TP: bf16 matmuls round differently, the optimizer state is the same
    # (measured 1.1e-4; a fresh optimizer is off by 2e-2 after one step)
    assert runs["bf_r211"] == pytest.approx(runs["bf_straight"][HALF:], abs=1e-3)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("zero", [2, 3])
def test_zero_2_3_resume_is_exact(runs, zero):
    assert runs[f"z{zero}_resumed"] == runs[f"z{zero}"][HALF:]


def test_dropping_optimizer_state_needs_weights_only(runs, tmp_path, capsys):
    """HF export of a trained checkpoint, and reshard of ZeRO-0 state (kept in the model files,
    which reshard cannot carry), refuse without --weights-only; with it they warn."""
    from checkpoint_tools.convert_checkpoint import main

    cases = [
        (["mtnlg-to-hf"], str(runs["ck"]), "optimizer state (zero_pp_rank_* files"),
        (
            ["reshard", "--tp", "1", "--pp", "1"],
            runs["z0"],
            "optimizer state inside the model files (ZeRO stage 0)",
        ),
    ]
    for cmd, src, what in cases:
        out = str(tmp_path / cmd[0])
        assert main([*cmd, "--input", src, "--output", out]) == 2
        err = capsys.readouterr().err
        assert "pass --weights-only" in err and what in err, err
        assert not Path(out).exists()
        assert main([*cmd, "--input", src, "--output", out, "--weights-only"]) == 0
        assert f"warning: --weights-only: dropping the {what}" in capsys.readouterr().err
    meta = json.loads((tmp_path / "reshard" / TAG / "mtnlg_meta.json").read_text())
    assert meta["weights_only"] is True


def _resolve(tmp_path, flags, cfg=None):
    from mtnlg.distributed.topology import ParallelDims
    from mtnlg.training.arguments import build_parser
    from mtnlg.training.setup import batch_sizes, resolve_ds_config

    extra = []
    if cfg is not None:
        (tmp_path / "ds.json").write_text(json.dumps(cfg))
        extra = ["--deepspeed_config", str(tmp_path / "ds.json")]
    argv = ["--micro-batch-size", "2", "--global-batch-size", "8", *flags, *extra]
    args = build_parser("test").parse_args(argv)
    dims = ParallelDims(world_size=1)
    return resolve_ds_config(args, dims, batch_sizes(args, dims))


def test_bf16_zero1_accumulates_in_fp32_by_default(tmp_path):
    from mtnlg.training.setup import ConfigError

    got = _resolve(tmp_path, ["--bf16", "--zero-stage", "1"])
    assert got["data_types"] == {"grad_accum_dtype": "fp32"}
    mine = {"data_types": {"grad_accum_dtype": "bf16"}}
    assert _resolve(tmp_path, ["--bf16"], mine)["data_types"]["grad_accum_dtype"] == "bf16"
    assert "data_types" not in _resolve(tmp_path, ["--zero-stage", "1"])  # fp32 run
    assert "data_types" not in _resolve(tmp_path, ["--bf16", "--zero-stage", "0"])
    fp32 = {"data_types": {"grad_accum_dtype": "fp32"}}
    with pytest.raises(ConfigError, match=r"grad_accum_dtype='fp32' with bf16 and ZeRO stage 0"):
        _resolve(tmp_path, ["--bf16", "--zero-stage", "0"], fp32)


@pytest.mark.parametrize("fmt", ["zero", "bf16"])
def test_partition_for_another_dp_reads_only_overlapping_files(fmt):
    """Partitions written for DP=4 (both formats), cut for DP=3: each rank's slice equals the flat
    vector's, and only the DP files that overlap it are opened."""
    from mtnlg.checkpoint import zero_state as zs

    total = 37  # DP4: padded to 40, partitions of 10; DP3: padded to 42, partitions of 14
    flat = {k: torch.randn(total) for k in zs.KINDS}
    tmpl = {"base_optimizer_state": {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": []}}
    if fmt == "zero":
        tmpl["zero_stage"] = 1
    osds = []
    for d in range(4):
        lo, hi = d * 10, (d + 1) * 10
        part = {
            k: torch.cat([v[lo:hi], torch.zeros(max(0, hi - max(lo, total)))])
            for k, v in flat.items()
        }
        osds.append(zs.build_osd(tmpl, [part], [total], 4, d))
    assert osds[3]["single_partition_of_fp32_groups"][0].numel() == (7 if fmt == "zero" else 10)
    for d, want_files in enumerate([[0, 1], [1, 2], [2, 3]]):
        reader = zs.FlatReader(lambda k: osds[k], 4, "test")
        got = zs.rank_partition(reader, 0, total, 3, d)
        assert reader.opened == want_files
        for k in zs.KINDS:
            want = flat[k][d * 14 : (d + 1) * 14]
            assert torch.equal(got[k][: want.numel()], want)
            assert not got[k][want.numel() :].any() and got[k].numel() == 14
