"""DeepSpeed's CPU shm all-reduce workspace does not outlive a run launched by `deepspeed`.

DeepSpeed 0.19 creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
(69 MB each) when all ranks share a host and never removes it; a day of test runs once filled
20 GB of RAM this way. ``init_distributed`` unlinks each rank's file once all ranks mapped it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.dist import deepspeed_cmd

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
from mtnlg.distributed import init

released = []
real = init.release_shm_workspace
def spy():
    path = init.shm_workspace_path(int(os.environ["RANK"]))
    existed = os.path.exists(path)
    released.append((existed, real()))
    return released[-1][1]
init.release_shm_workspace = spy
init.init_distributed(timeout_minutes=2)
t = torch.ones(4)
dist.all_reduce(t)  # the group still works once the names are gone
rank = dist.get_rank()
init.shutdown()
print("RESULT " + json.dumps({"rank": rank, "port": os.environ["MASTER_PORT"],
      "released": released, "sum": t[0].item()}))
"""


@pytest.mark.timeout(240)
def test_deepspeed_launch_leaves_no_shm_workspace(tmp_path):
    script, hostfile = tmp_path / "init_only.py", tmp_path / "hostfile"
    script.write_text(SCRIPT)
    hostfile.write_text("localhost slots=2\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = deepspeed_cmd(script, [], hostfile)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # ranks' prints may share a line: take each {...} after a marker
    results = [json.loads(m) for m in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]
    assert sorted(r["rank"] for r in results) == [0, 1], proc.stdout[-2000:]
    for r in results:
        # the file existed (DeepSpeed did create it: the naming still matches) and was removed
        assert r["released"] == [[True, True]], r
        assert r["sum"] == 2.0
    port = results[0]["port"]
    left = [p for p in os.listdir("/dev/shm") if f"_{port}_" in p]
    assert left == [], left
    assert sys.platform.startswith("linux")
