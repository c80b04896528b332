"""Corrupt checkpoints are refused by every reader, naming the file or the tag; ``--keep-last``.

One TP=2 run (spawned ranks) saves at iterations 2, 4 and 6 with ``--keep-last 2`` into a folder
that also holds a stale ``.partial`` folder; corrupt copies of its newest tag then go to the
converter (in-process ``main``), ``pretrain.py --load`` and ``evaluate.py`` (their drivers, in
the same two ranks).
Bad tags are caught before any model is built (one process); missing, truncated and altered
files (same size: the hashes) by the two ranks of a real TP=2 load, which split the checks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mtnlg.checkpoint.integrity import MANIFEST
from tests.e2e.conftest import ROOT
from tests.faults.launched import fault_args
from tests.helpers.dist import free_port, run_distributed

TAG = "iter_0000006"
WIKI = ROOT / "data" / "wikitext" / "wiki.test.tokens"


# corrupt copy -> the drivers that load it on the two ranks of a real TP=2 run
LOADS = {"altered": ("train", "eval"), "truncated": ("train",), "missing": ("eval",)}


def _save_then_load_corrupt(rank, world_size, prefix, root, scratch, text):
    """Train and save; then load corrupt copies of the checkpoint through both drivers."""
    import torch.distributed as dist

    from mtnlg.evaluation import run as ev
    from mtnlg.training import checkpointing, pretrain
    from mtnlg.training.arguments import build_parser

    extra = ["--save", str(root), "--save-interval", "2", "--keep-last", "2"]
    pretrain._run(build_parser("t").parse_args(fault_args(prefix, iters=6, extra=extra)))
    out = {}
    for fault, jobs in LOADS.items():
        if rank == 0:
            corrupt_copy(root, scratch, fault)
        dist.barrier()
        d = str(scratch / fault)
        for job in jobs:
            try:
                if job == "train":
                    pretrain._run(
                        build_parser("t").parse_args(fault_args(prefix, extra=["--load", d]))
                    )
                else:
                    args = ev.build_parser("e").parse_args(["--load", d, "--text-file", str(text)])
                    ev._run(args, checkpointing.read_meta(d))
                out[fault, job] = None
            except SystemExit as e:
                out[fault, job] = e.code
    return out


@pytest.fixture(scope="module")
def run(demo_prefix, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "run"
    (root / "iter_0000001.partial").mkdir(parents=True)  # a crashed save's leftovers
    scratch, text = root.parent / "corrupt", root.parent / "text.txt"
    scratch.mkdir()
    text.write_text(WIKI.read_text()[:3000])  # a few windows
    job = (demo_prefix, root, scratch, text)
    codes = run_distributed(_save_then_load_corrupt, 2, args=job, timeout=280)
    return root, codes, text


@pytest.fixture
def saved(run):
    return run[0]


def test_keep_last_and_manifest(saved):
    assert (saved / "latest").read_text().strip() == TAG
    assert sorted(p.name for p in saved.iterdir() if p.is_dir()) == ["iter_0000004", TAG]
    import json

    files = json.loads((saved / TAG / MANIFEST).read_text())["files"]
    on_disk = sorted(
        p.relative_to(saved / TAG).as_posix()
        for p in (saved / TAG).rglob("*")
        if p.is_file() and p.name != MANIFEST
    )
    assert sorted(files) == on_disk  # every rank's files, nothing else
    assert {"mp_rank_01_model_states.pt", "rng/rank_00001.pt"} <= set(files)


def test_prune_never_deletes_latest_or_only_complete(tmp_path):
    from mtnlg.training.checkpointing import prune

    for it in (2, 4, 6):
        (tmp_path / f"iter_000000{it}").mkdir()
        (tmp_path / f"iter_000000{it}" / "mtnlg_meta.json").write_text("{}")
    (tmp_path / "iter_0000008.partial").mkdir()
    (tmp_path / "latest").write_text("iter_0000002\n")  # e.g. resumed from an older tag
    assert prune(tmp_path, 1) == ["iter_0000004", "iter_0000008.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000006", "latest"]
    (tmp_path / "latest").write_text("iter_0000006\n")
    assert prune(tmp_path, 1) == ["iter_0000002"]
    assert prune(tmp_path, 1) == []  # the only complete one stays


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


# fault -> (what it does to the copy, what the error must name)
FAULTS = {
    "truncated": (lambda d: _truncate(d / TAG / "mp_rank_01_model_states.pt"), "mp_rank_01"),
    "missing": (
        lambda d: (d / TAG / "zero_pp_rank_0_mp_rank_01_optim_states.pt").unlink(),
        "zero_pp_rank_0_mp_rank_01_optim_states.pt",
    ),
    "wrong_tag": (lambda d: (d / "latest").write_text("iter_0000099\n"), "iter_0000099"),
    "incomplete_tag": (
        lambda d: (
            shutil.copytree(d / TAG, d / "iter_0000008"),
            (d / "iter_0000008" / "mtnlg_meta.json").unlink(),
            (d / "latest").write_text("iter_0000008\n"),
        ),
        "iter_0000008",
    ),
    "altered": (lambda d: _flip_byte(d / TAG / "mp_rank_00_model_states.pt"), "mp_rank_00"),
}


def corrupt_copy(saved: Path, dest: Path, fault: str) -> Path:
    d = dest / fault
    shutil.copytree(saved, d)
    FAULTS[fault][0](d)
    return d


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_converter_refuses(saved, tmp_path, capsys, fault):
    from checkpoint_tools.convert_checkpoint import main

    d = corrupt_copy(saved, tmp_path, fault)
    argv = ["reshard", "--input", str(d), "--output", str(tmp_path / "out"), "--tp", "1"]
    assert main([*argv, "--pp", "1"]) == 2
    err = capsys.readouterr().err
    assert FAULTS[fault][1] in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def _one_process(monkeypatch) -> None:
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    for k, v in {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)


def test_pretrain_and_evaluate_refuse_bad_tags(run, demo_prefix, tmp_path, monkeypatch):
    """``latest`` naming a missing or an incomplete tag: refused before anything is built."""
    from mtnlg.evaluation import run as ev
    from mtnlg.training import pretrain

    _one_process(monkeypatch)
    for fault in ("wrong_tag", "incomplete_tag"):
        d = str(corrupt_copy(run[0], tmp_path, fault))
        with pytest.raises(SystemExit) as e:
            pretrain.run(fault_args(demo_prefix, extra=["--load", d]))
        with pytest.raises(SystemExit) as e2:
            ev.run(["--load", d, "--task", "wikitext", "--text-file", str(run[2])])
        for msg in (str(e.value.code), str(e2.value.code)):
            assert FAULTS[fault][1] in msg and d in msg, msg


def test_pretrain_and_evaluate_refuse_corrupt_files(run):
    """Truncated, missing, altered (same size: the ranks' shares of the SHA-256s): refused by
    the TP=2 loads, rank 0 naming the file, the other rank exiting too (quietly)."""
    codes = run[1]
    for (fault, job), code in codes[0].items():
        assert code is not None and FAULTS[fault][1] in str(code), (fault, job, code)
        assert "sha256" in str(code) or fault != "altered"
    assert sorted(codes[0]) == sorted((f, j) for f, jobs in LOADS.items() for j in jobs)
    assert set(codes[1].values()) == {1}


def test_checkpoint_without_manifest_still_loads(saved, tmp_path, capsys):
    from checkpoint_tools.convert_checkpoint import main

    old = tmp_path / "old"
    shutil.copytree(saved, old)
    (old / TAG / MANIFEST).unlink()  # as written before manifests existed
    out = tmp_path / "out"
    assert (
        main(["reshard", "--input", str(old), "--output", str(out), "--tp", "1", "--pp", "1"]) == 0
    )
    assert capsys.readouterr().err.count(f"has no {MANIFEST}") == 1
    assert (out / TAG / MANIFEST).is_file()  # the converter's outputs carry one
