"""``bench/bench_mfu.py`` end to end on the CPU at the tiny size (the path the GPU run takes:
pretrain.run, DeepSpeed's wall-clock timers, the JSON summary). Slow: about a minute."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_mfu_tiny_runs_on_cpu(tmp_path):
    from bench.bench_mfu import main

    out = tmp_path / "mfu.json"
    result = main(["--tiny", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["device"] == "cpu" and result["iterations"] == 4
    assert result["tflops_per_gpu"] > 0 and result["mfu"] is None  # no peak known on the CPU
    for key in ("forward", "backward", "step"):
        assert result["breakdown_ms"][key] > 0
