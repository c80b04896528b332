"""Checkpoint files crafted to run code are refused by every ``--load``; real ones still load.

One process group of two ranks saves tiny checkpoints (ZeRO 0/1/2/3, bf16, PP = 2, a distilled
student), resumes each with ``torch.load`` watched (every call must be ``weights_only=True``;
DeepSpeed's reads must go through ``SafeCheckpointEngine``), then loads copies in which a file is
replaced by a pickle whose unpickling would run ``touch MARKER`` (``os.system``), the integrity
manifest rewritten so the unpickler is really reached. DeepSpeed's stock ``TorchCheckpointEngine``
creates the marker from such a file (checked by hand, not here: no test runs the payload).

Refused: ``pretrain.py``, ``evaluate.py`` and ``distill.py`` resume (DeepSpeed: the files are
checked by the ranks before DeepSpeed reads any), ``finetune.py --load`` and a distillation
``--teacher`` (the converter's reader); and, with that check switched off, by the engine
itself (model file, ZeRO optimizer shards, pipeline layer files).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from tests.e2e.test_pretrain import base_args
from tests.finetuning.ft_runs import sst2_sample
from tests.helpers.dist import run_distributed

TAG = "iter_0000002"
SAVE = ["--train-iters", "3", "--save-interval", "2", "--exit-interval", "2"]
LAYOUTS = {  # name: extra pretraining flags of a real checkpoint resumed through the engine
    "z0": ["--zero-stage", "0"],
    "z1": ["--zero-stage", "1"],
    "z2": ["--zero-stage", "2"],
    "z3": ["--zero-stage", "3"],
    "bf16": ["--bf16", "--zero-stage", "1"],
    "pp2": ["--pipeline-model-parallel-size", "2", "--zero-stage", "1"],
}


class Payload:
    """Unpickles as ``os.system(cmd)``."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def craft(root: Path, out: Path, files: list[str], marker: Path) -> str:
    """A copy of checkpoint ``root`` whose ``files`` (in its tag) would run ``touch marker`` when
    unpickled, its manifest rewritten to match (sizes, SHA-256)."""
    from mtnlg.checkpoint import integrity

    shutil.copytree(root, out)
    for name in files:
        torch.save({"module": Payload(f"touch {shlex.quote(str(marker))}")}, out / TAG / name)
    integrity.write_local_manifest(out / TAG, TAG)
    return str(out)


def weights_only_copy(root: Path, out: Path) -> str:
    """A copy of ``root`` whose metadata says ``weights_only`` (``checkpointing.load`` then loads
    no optimizer state: at ZeRO-3 DeepSpeed reads the weights through ``zero_to_fp32``)."""
    from mtnlg.checkpoint import integrity

    shutil.copytree(root, out)
    meta = out / TAG / "mtnlg_meta.json"
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), weights_only=True)))
    integrity.write_local_manifest(out / TAG, TAG)
    return str(out)


def pretrain_args(prefix, extra):
    return base_args(prefix, iters=3, extra=[*extra, "--log-interval", "1"])


def distill_args(prefix, teacher, extra=()):
    return [
        "--teacher", teacher, "--student-num-layers", "2", "--student-init", "teacher-layers",
        "--student-init-layers", "0,2", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3", "--seed", "11",
        "--data-path", prefix, "--split", "95,5,0", "--eval-interval", "1000",
        "--eval-iters", "1", "--log-interval", "1", "--no-progress", *extra,
    ]  # fmt: skip


class Watch:
    """Every ``torch.load`` (file name, weights_only) of this process while on, and the files
    read through ``SafeCheckpointEngine.load`` and through ``zero_to_fp32``'s safe ``torch``."""

    def __init__(self):
        from mtnlg.checkpoint import safe_engine

        self.engine, self.direct = safe_engine.SafeCheckpointEngine, safe_engine._SafeTorch
        self.calls: list[tuple[str, bool]] = []
        self.engine_files: list[str] = []
        self.direct_files: list[str] = []

    def __enter__(self):
        real, real_engine, real_direct = torch.load, self.engine.load, self.direct.load
        self.saved = real, real_engine, self.direct.__dict__["load"]  # a staticmethod

        def load(f, *a, **k):
            self.calls.append((Path(f).name, k.get("weights_only")))
            return real(f, *a, **k)

        def engine_load(engine, path, map_location=None):
            self.engine_files.append(Path(path).name)
            return real_engine(engine, path, map_location)

        def direct_load(f, *a, **k):
            self.direct_files.append(Path(f).name)
            return real_direct(f, *a, **k)

        torch.load, self.engine.load = load, engine_load
        self.direct.load = staticmethod(direct_load)
        return self

    def __exit__(self, *exc):
        torch.load, self.engine.load, self.direct.load = self.saved


def _attempt(job) -> object:
    """None when ``job()`` returned, else its SystemExit code."""
    try:
        job()
        return None
    except SystemExit as e:
        return e.code


def _body(rank, world_size, prefix, root, text, train):
    import torch.distributed as dist

    from mtnlg.checkpoint import safe_engine
    from mtnlg.distillation import driver
    from mtnlg.evaluation import run as ev
    from mtnlg.finetuning.arguments import build_finetune_parser
    from mtnlg.finetuning.run import _run as finetune
    from mtnlg.training import checkpointing, pretrain
    from mtnlg.training.arguments import build_parser

    def train_run(argv):
        return pretrain._run(build_parser("t").parse_args(argv))

    def distill_run(argv):
        return driver._run(driver.build_distill_parser("d").parse_args(argv))

    def evaluate(d):
        args = ev.build_parser("e").parse_args(["--load", d, "--text-file", str(text)])
        return ev._run(args, checkpointing.read_meta(d))

    out: dict = {"resumed": {}}
    # real checkpoints, resumed with every torch.load watched
    for name, extra in LAYOUTS.items():
        d = str(root / name)
        train_run(pretrain_args(prefix, [*extra, *SAVE, "--save", d]))
        with Watch() as w:
            progress = train_run(pretrain_args(prefix, [*extra, "--load", d]))
        out["resumed"][name] = (progress.iteration, w.calls, w.engine_files)
    z3w = weights_only_copy(root / "z3", root / "z3w") if rank == 0 else str(root / "z3w")
    dist.barrier()
    with Watch() as w:
        progress = train_run(pretrain_args(prefix, [*LAYOUTS["z3"], "--load", z3w]))
        out["resumed"]["z3 weights"] = (progress.iteration, w.calls, w.engine_files)
        out["direct"] = w.direct_files
    teacher, student = str(root / "z1"), str(root / "student")
    distill_run(distill_args(prefix, teacher, [*SAVE[2:], "--save", student]))
    with Watch() as w:
        progress = distill_run(distill_args(prefix, teacher, ["--load", student]))
        out["resumed"]["distill"] = (progress.iteration, w.calls, w.engine_files)
    with Watch() as w:
        evaluate(str(root / "z0"))
        out["resumed"]["evaluate"] = (None, w.calls, w.engine_files)

    # crafted copies (rank 0 writes them)
    bad, marker = root / "crafted", root / "markers"
    model, optim = "mp_rank_00_model_states.pt", "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
    plan = {
        "model": ("z1", [model]),
        "optim": ("z1", [optim.format(1)]),
        "optims": ("z1", [optim.format(0), optim.format(1)]),
        "layers": ("pp2", [f"layer_{i:02d}-model_00-model_states.pt" for i in range(7)]),
        "student": ("student", [model]),
        "z3w": ("z3w", [optim.format(0), optim.format(1)]),
    }
    if rank == 0:
        marker.mkdir()
        for case, (src, files) in plan.items():
            craft(root / src, bad / case, [f for f in files if (root / src / TAG / f).exists()],
                  marker / case)  # fmt: skip
    dist.barrier()
    c = {k: str(bad / k) for k in plan}
    z1, pp2, z3 = LAYOUTS["z1"], LAYOUTS["pp2"], LAYOUTS["z3"]
    jobs = {
        "pretrain model": lambda: train_run(pretrain_args(prefix, [*z1, "--load", c["model"]])),
        "pretrain optim": lambda: train_run(pretrain_args(prefix, [*z1, "--load", c["optim"]])),
        "evaluate": lambda: evaluate(c["model"]),
        "distill resume": lambda: distill_run(distill_args(prefix, teacher, ["--load", c["student"]])),
        "distill teacher": lambda: distill_run(distill_args(prefix, c["model"])),
        "finetune": lambda: finetune(build_finetune_parser("f").parse_args(
            ["--task", "classification", "--train-data", str(train), "--load", c["model"],
             "--train-iters", "1", "--micro-batch-size", "2", "--global-batch-size", "4"])),
    }  # fmt: skip
    engine_jobs = {  # the ranks' check of the files switched off: DeepSpeed reads them
        "engine model": lambda: train_run(pretrain_args(prefix, [*z1, "--load", c["model"]])),
        "engine optim": lambda: train_run(pretrain_args(prefix, [*z1, "--load", c["optims"]])),
        "engine layers": lambda: train_run(pretrain_args(prefix, [*pp2, "--load", c["layers"]])),
        "zero_to_fp32": lambda: train_run(pretrain_args(prefix, [*z3, "--load", c["z3w"]])),
    }
    out["codes"] = {name: _attempt(job) for name, job in jobs.items()}
    check, safe_engine.check_files = safe_engine.check_files, lambda *a, **k: []
    try:
        out["codes"].update({name: _attempt(job) for name, job in engine_jobs.items()})
    finally:
        safe_engine.check_files = check
    dist.barrier()
    out["markers"] = sorted(p.name for p in marker.iterdir())
    return out


@pytest.fixture(scope="module")
def runs(demo_prefix, tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    text = root / "text.txt"
    text.write_text("ROMEO: the quick brown fox jumps over the lazy dog. " * 20)
    train = sst2_sample(root, "train", 16)
    job = (demo_prefix, root / "ck", text, train)
    return run_distributed(_body, 2, args=job, timeout=1500, start_method="forkserver")


@pytest.mark.timeout(1600)
def test_crafted_files_run_nothing(runs):
    for r in runs:
        assert r["markers"] == []


@pytest.mark.timeout(1600)
@pytest.mark.parametrize(
    "job,file",
    [
        ("pretrain model", "crafted/model/iter_0000002/mp_rank_00_model_states.pt"),
        ("pretrain optim", "crafted/optim/iter_0000002/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        ("evaluate", "crafted/model/iter_0000002/mp_rank_00_model_states.pt"),
        ("distill resume", "crafted/student/iter_0000002/mp_rank_00_model_states.pt"),
    ],
)
def test_deepspeed_loads_refuse_before_reading(runs, job, file):
    """Rank 0 names the file and the refused type; every rank exits non-zero."""
    first, second = (r["codes"][job] for r in runs)
    assert isinstance(first, str) and first.startswith("error: --load "), first
    assert file in first and "outside the allow-list" in first and "posix.system" in first
    assert second == 1


@pytest.mark.timeout(1600)
@pytest.mark.parametrize(
    "job,flag",
    [("finetune", "--load"), ("distill teacher", "--teacher")],
)
def test_converter_reads_refuse(runs, job, flag):
    for r in runs:
        code = r["codes"][job]
        assert isinstance(code, str) and code.startswith(f"error: {flag} "), code
        assert "mp_rank_00_model_states.pt: holds a type outside the allow-list" in code


@pytest.mark.timeout(1600)
@pytest.mark.parametrize(
    "job,files",
    [
        ("engine model", ["mp_rank_00_model_states.pt"] * 2),
        ("engine optim", [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]),
        (
            "engine layers",
            ["layer_00-model_00-model_states.pt", "layer_03-model_00-model_states.pt"],
        ),
        ("zero_to_fp32", ["zero_pp_rank_0_mp_rank_00_optim_states.pt"] * 2),
    ],
)
def test_engine_refuses_what_deepspeed_reads(runs, job, files):
    """Without the ranks' check, the first crafted file each rank's DeepSpeed reads is refused:
    the model file, its ZeRO optimizer shard, its first pipeline layer (SafeCheckpointEngine),
    and at ZeRO-3 without optimizer state the shards ``zero_to_fp32`` reads itself."""
    for r, file in zip(runs, files):
        code = r["codes"][job]
        assert isinstance(code, str) and code.startswith("error: --load "), code
        assert f"{file}: holds a type outside the allow-list" in code


EXPECTED = {  # files each rank's DeepSpeed reads through SafeCheckpointEngine (rank 0, rank 1)
    "z0": [{"mp_rank_00_model_states.pt"}] * 2,
    "z1": [{"mp_rank_00_model_states.pt", f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"} for r in (0, 1)],
    "z2": [{"mp_rank_00_model_states.pt", f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"} for r in (0, 1)],
    "z3": [{f"zero_pp_rank_{r}_mp_rank_00_model_states.pt",
            f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"} for r in (0, 1)],
    "bf16": [{"mp_rank_00_model_states.pt", f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"} for r in (0, 1)],
    "pp2": [{"mp_rank_00_model_states.pt", "layer_00-model_00-model_states.pt",
             "layer_01-model_00-model_states.pt", "layer_02-model_00-model_states.pt",
             "zero_pp_rank_0_mp_rank_00_optim_states.pt"},
            {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt",
             "layer_03-model_00-model_states.pt", "layer_04-model_00-model_states.pt",
             "layer_05-model_00-model_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"}],
    "z3 weights": [{f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"} for r in (0, 1)],
    "distill": [{"mp_rank_00_model_states.pt", f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"} for r in (0, 1)],
    "evaluate": [{"mp_rank_00_model_states.pt"}] * 2,
}  # fmt: skip


@pytest.mark.timeout(1600)
@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_checkpoints_load_through_safe_engine(runs, name):
    """ZeRO 0/1/2/3, bf16 (BF16_Optimizer), PP = 2, a distilled student and an evaluation load
    their real checkpoints; no file is unpickled with weights_only=False."""
    for r, expected in zip(runs, EXPECTED[name]):
        iteration, calls, engine_files = r["resumed"][name]
        assert iteration in (None, 3), iteration  # resumed at 2, trained to 3
        assert calls and all(wo is True for _, wo in calls), calls
        assert set(engine_files) == expected


@pytest.mark.timeout(1600)
def test_zero3_weights_only_reads_through_zero_to_fp32_safely(runs):
    """DeepSpeed's ZeRO-3 load without optimizer state reads every shard with its own
    ``torch.load``: here through the safe one (and weights_only=True, checked above)."""
    shards = {
        f"zero_pp_rank_{d}_mp_rank_00_{k}_states.pt" for d in (0, 1) for k in ("model", "optim")
    }
    for r in runs:
        assert set(r["direct"]) == shards


def test_install_is_idempotent_and_refuses_universal_checkpoints():
    """No process group: a stand-in engine with DeepSpeed's own torch checkpoint engine."""
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from mtnlg.checkpoint import safe_engine

    engine = SimpleNamespace(
        checkpoint_engine=TorchCheckpointEngine(),
        load_universal_checkpoint=lambda: False,
        load_checkpoint=lambda load_dir, **kw: (load_dir, {}),
    )
    safe_engine.install(engine)
    guarded = engine.load_checkpoint
    safe_engine.install(engine)
    assert isinstance(engine.checkpoint_engine, safe_engine.SafeCheckpointEngine)
    assert engine.load_checkpoint is guarded and guarded("d") == ("d", {})
    engine.load_universal_checkpoint = lambda: True
    with pytest.raises(SystemExit, match="load_universal"):
        safe_engine.install(engine)
