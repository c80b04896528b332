"""A disk that fills during a save, through the real ``deepspeed`` launcher (TP=2, two ranks).

The save folder is a tmpfs mounted for the test, sized so that the checkpoint of iteration 2
fits and the one of iteration 4 does not: the ranks that hit ENOSPC and the ones that do not
agree, the job exits non-zero (no hang) naming the path and the error, ``latest`` still names
iteration 2, no half-written tag is left, and iteration 2 still loads (the converter reads and
checks all of it). Where mounting is not allowed (an unprivileged container), the same run goes
with ``RLIMIT_FSIZE`` under the optimizer files' size instead (EFBIG: Python ignores SIGXFSZ),
after an unlimited run wrote iteration 2; the test prints which mechanism ran.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.faults.launched import Job, fault_args, run_to_end

TAG_MB = 11  # one tag of the fault model is ~7.3 MB: one fits, two do not


def _mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True)
    if os.environ.get("MTNLG_TEST_NO_TMPFS") or shutil.which("mount") is None:
        return False
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={TAG_MB}M", "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@contextmanager
def _file_size_limit(size: int | None):
    """RLIMIT_FSIZE (soft) of this process while the launcher starts: its ranks inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if size is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.timeout(600)
def test_disk_full_during_save(demo_prefix, tmp_path):
    from checkpoint_tools.convert_checkpoint import main as convert

    save = tmp_path / "small"
    mounted = _mount_tmpfs(save)
    try:
        args = fault_args(demo_prefix, iters=4, extra=["--save", str(save)])
        args += ["--save-interval", "2"]
        fsize = None
        if not mounted:  # iteration 2 unlimited, then resume under the limit
            run_to_end(fault_args(demo_prefix, iters=2, extra=["--save", str(save)]), tmp_path)
            fsize = 2**21  # the model files (0.9 MB) fit, the optimizer files (2.6 MB) do not
            args += ["--load", str(save)]
        print(f"disk-full mechanism: {'tmpfs' if mounted else 'RLIMIT_FSIZE (EFBIG)'}")
        t0 = time.monotonic()
        with _file_size_limit(fsize):
            job = Job(args, tmp_path / "full")
        try:
            rc = job.wait(timeout=300)  # a hang is killed (whole session) and fails here
        finally:
            job.kill()
        took, log = time.monotonic() - t0, job.log()
        assert rc != 0
        why = "ENOSPC" if mounted else "EFBIG"
        assert "saving iter_0000004 failed" in log and why in log, log
        assert str(save / "iter_0000004.partial") in log  # the file that could not be written
        assert "'latest' still names iter_0000002" in log
        assert (save / "latest").read_text().strip() == "iter_0000002"
        assert sorted(p.name for p in save.iterdir() if p.is_dir()) == ["iter_0000002"]
        out = str(tmp_path / "tp1")
        assert (
            convert(["reshard", "--input", str(save), "--output", out, "--tp", "1", "--pp", "1"])
            == 0
        )
        line = next(x for x in log.splitlines() if "failed on rank" in x)
        print(f"disk full: job exited {rc} after {took:.1f} s: {line}")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(save)], check=False)
