"""fp16 non-finite steps under the real ``deepspeed`` launcher on a GPU (issue 16, fault 3):
overflows count only at the minimum loss scale. Lives here so ``pytest -m gpu tests/gpu``
collects it; the CPU cases are in tests/faults/test_nonfinite_launcher.py."""

from __future__ import annotations

import pytest
import torch

from mtnlg.training.metrics import read_metrics
from tests.e2e.conftest import demo_prefix  # noqa: F401 - the fixture
from tests.e2e.test_pretrain import base_args
from tests.faults.test_nonfinite_launcher import _poisoned_launch

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16)")


@pytest.mark.gpu
@GPU
@pytest.mark.timeout(600)
def test_fp16_overflows_count_only_at_minimum_loss_scale(demo_prefix, tmp_path):  # noqa: F811
    """fp16 (never run on the CPU: DeepSpeed refuses fp16 there). Scale 16, minimum 4, every
    iteration from 3 on poisoned: 3 and 4 only halve the scale (not counted), 5 and 6 overflow at
    the minimum and stop the job at 6 (max 2). ZeRO 0 with torch's Adam: FP16_UnfusedOptimizer,
    which (unlike ZeRO's scaler) does not raise at the minimum scale itself."""
    import json

    metrics, ds_json = tmp_path / "metrics.jsonl", tmp_path / "ds.json"
    ds_json.write_text(
        json.dumps(
            {
                "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 4,
                         "min_loss_scale": 4, "hysteresis": 1, "loss_scale_window": 1000},
                "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
            }
        )
    )  # fmt: skip
    flags = ["--fp16", "--zero-stage", "0", "--deepspeed_config", ds_json, "--log-interval", "1"]
    flags += ["--eval-interval", "0", "--metrics-file", metrics, "--max-consecutive-nonfinite", "2"]
    log = _poisoned_launch(base_args(demo_prefix, iters=8, extra=flags), "3,4,5,6,7,8", 1, "cuda")
    assert "stopping at iteration 6" in log and "(5-6;" in log, log[-3000:]
    rows = read_metrics(str(metrics), "train")
    assert [r["skipped_iters"] for r in rows] == [0, 0, 1, 2, 3, 4], rows
    assert [r["loss_scale"] for r in rows][2:] == [8, 4, 4, 4], rows
