"""Run a ``launch/`` script with its launchers shadowed by a recorder, then parse what it built.

The recorder (``deepspeed``, ``mpirun``, ``python``, ... first on PATH, or named by the scripts'
``DS``/``PY``/``PYTHON`` variables) only appends its name and argv to a JSON Lines file: it
captures the generated command lines and launches nothing. :func:`check` then feeds each line
to the real parsers: DeepSpeed's runner (``deepspeed.launcher.runner.parse_args``, hostfiles
through its ``fetch_hostfile``), torch's ``torch.distributed.run`` parser, the entry scripts'
own parsers (those their ``run()`` builds), and for ``mpirun`` the real ``mpirun`` with the
script's flags and ``true`` as the program. A misspelled flag anywhere is an ``AssertionError``
naming it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.e2e.conftest import ROOT

RECORDED = ("deepspeed", "mpirun", "srun", "torchrun", "python", "python3", "cat")
"""Programs the scripts start (``cat`` prints result files the recorded runs did not write)."""


def _entry_parsers() -> dict[str, Callable]:
    """Entry script -> the parser its ``run()`` parses with (the real one, not a copy)."""
    from mtnlg.compression.run import build_parser as prune_parser
    from mtnlg.distillation.driver import build_distill_parser
    from mtnlg.evaluation.run import build_parser as eval_parser
    from mtnlg.finetuning.arguments import build_finetune_parser
    from mtnlg.inference.cli import build_parser as generate_parser
    from mtnlg.pretrain import build_parser as pretrain_parser

    return {
        "mtnlg/pretrain.py": pretrain_parser,
        "mtnlg/evaluate.py": lambda: eval_parser("evaluate"),
        "mtnlg/generate.py": lambda: generate_parser("generate"),
        "mtnlg/finetune.py": lambda: build_finetune_parser("finetune"),
        "mtnlg/distill.py": lambda: build_distill_parser("distill"),
        "mtnlg/prune.py": lambda: prune_parser("prune"),
    }


def _module_parsers() -> dict[str, Callable]:
    from mtnlg.data.preprocess import build_parser as preprocess_parser
    from mtnlg.plot import build_parser as plot_parser

    return {"mtnlg.data.preprocess": preprocess_parser, "mtnlg.plot": plot_parser}


def write_recorders(bin_dir: Path, record: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    body = (
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(record)!r}, 'a') as f:\n"
        "    f.write(json.dumps([os.path.basename(sys.argv[0]), sys.argv[1:]]) + '\\n')\n"
    )
    for name in RECORDED:
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    # SLURM's hostlist expansion for a plain comma-separated SLURM_JOB_NODELIST (no SLURM here)
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "$3" | tr , "\\n"\n'
    )
    (bin_dir / "scontrol").chmod(0o755)


def copy_tree(dst: Path) -> Path:
    """``launch/`` and ``ds_configs/`` copied (the scripts cd to their parent and write there),
    ``mtnlg`` and ``data`` linked."""
    shutil.copytree(ROOT / "launch", dst / "launch")
    shutil.copytree(ROOT / "ds_configs", dst / "ds_configs")
    for name in ("mtnlg", "data"):
        (dst / name).symlink_to(ROOT / name)
    return dst


def record(script: Path, tree: Path, env: dict[str, str], args=(), timeout=60) -> list:
    """Run ``script`` (inside ``tree``) with the recorders; return its recorded command lines."""
    bin_dir, rec = tree / "recorders", tree / "record.jsonl"
    write_recorders(bin_dir, rec)
    rec.unlink(missing_ok=True)
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "DS": str(bin_dir / "deepspeed"),
        "PY": str(bin_dir / "python"),
        "PYTHON": str(bin_dir / "python"),
        **env,
    }
    proc = subprocess.run(
        ["bash", str(script), *args],
        env=full_env,
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{script.name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    )
    return [json.loads(line) for line in rec.read_text().splitlines()] if rec.exists() else []


def _parse(parse: Callable, argv: list[str], what: str):
    """``parse(argv)`` (an argparse ``parse_args``); its usage error becomes an AssertionError."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parse(argv)
    except SystemExit as e:
        raise AssertionError(f"{what}: {err.getvalue().strip() or e}") from None


def _entry(script: str, argv: list[str], what: str) -> str:
    parsers = _entry_parsers()
    key = next((k for k in parsers if script == k or script.endswith("/" + k)), None)
    assert key is not None, f"{what}: unknown entry script {script}"
    _parse(parsers[key]().parse_args, argv, f"{what} {key}")
    return key


def check(records: list, tree: Path) -> list[tuple[str, str]]:
    """Parse every recorded command line; return ``(launcher, what it ran)`` pairs."""
    from deepspeed.launcher.runner import fetch_hostfile, parse_args
    from torch.distributed.run import get_args_parser

    done = []
    for prog, argv in records:
        if prog == "deepspeed":
            ds = _parse(parse_args, argv, "deepspeed launcher")
            hostfile = tree / ds.hostfile
            if hostfile.is_file():  # DeepSpeed's own hostfile parser
                assert fetch_hostfile(str(hostfile)), f"empty hostfile {ds.hostfile}"
            done.append(("deepspeed", _entry(ds.user_script, ds.user_args, "deepspeed")))
        elif prog in ("python", "python3") and argv[:2] == ["-m", "torch.distributed.run"]:
            tr = _parse(get_args_parser().parse_args, argv[2:], "torchrun")
            done.append(
                ("torchrun", _entry(tr.training_script, tr.training_script_args, "torchrun"))
            )
        elif prog in ("python", "python3") and argv[0] == "-m":
            _parse(_module_parsers()[argv[1]]().parse_args, argv[2:], argv[1])
            done.append(("python", argv[1]))
        elif prog in ("python", "python3") and argv[0].endswith(".py"):
            done.append(("python", _entry(argv[0], argv[1:], "python")))
        elif prog == "mpirun":
            done.append(("mpirun", _mpirun(argv, tree)))
        # python -c / python - (inline code) and cat: nothing to parse
    return done


def _mpirun(argv: list[str], tree: Path) -> str:
    """The real mpirun with the script's own flags runs ``true``; the program's flags parse."""
    i = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    mpirun = Path(sys.executable).parent / "mpirun"
    proc = subprocess.run(
        [str(mpirun), *argv[: i - 1], "true"], cwd=tree, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"mpirun rejected its flags:\n{proc.stderr[-2000:]}"
    return _entry(argv[i], argv[i + 1 :], "mpirun")
