"""A real Prometheus server scrapes a short pretraining run and the inference server; the test
reads Prometheus's HTTP API: both targets up, the trainer's logged loss and iteration count,
the server's generated tokens as the answers' ``usage`` counted them, and every query of the
Grafana dashboard accepted by Prometheus's PromQL parser."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from mtnlg.training.metrics import read_metrics
from tests.e2e.conftest import ROOT, demo_prefix  # noqa: F401 - the session fixture
from tests.e2e.test_pretrain import base_args
from tests.helpers.dist import free_port
from tests.monitoring.prom_helpers import (
    DEADLINE_S,
    prometheus,
    prometheus_binary,
    query,
    stop,
    target_up,
    wait_until,
)
from tests.monitoring.test_dashboard import DASHBOARD

ITERS = 10
SERVER = str(ROOT / "mtnlg" / "inference" / "server.py")


@pytest.fixture(scope="module", autouse=True)
def _prometheus_installed():
    """Skip (or fail under MTNLG_PROMETHEUS_REQUIRED=1) before the data and checkpoint work."""
    prometheus_binary()


def _env() -> dict:
    import os

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return env


def _dashboard_queries_parse(url: str) -> None:
    """Every panel query, its variables filled in, is valid PromQL for this Prometheus."""
    dash = json.loads(DASHBOARD.read_text())
    for p in dash["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "1m")
            query(url, expr.replace("$job", ".*").replace("$model_name", ".*"))


@pytest.mark.timeout(240)
def test_prometheus_scrapes_training(demo_prefix, tmp_path):  # noqa: F811
    port, metrics = free_port(), tmp_path / "m.jsonl"
    argv = base_args(demo_prefix, iters=ITERS, extra=["--eval-interval", "0"])
    argv += ["--metrics-port", str(port), "--metrics-linger", "30", "--metrics-file", str(metrics)]
    with prometheus(tmp_path, {"mtnlg-train": f"127.0.0.1:{port}"}) as url:
        log = open(tmp_path / "train.log", "w+")  # noqa: SIM115 - read back on failure
        cmd = [sys.executable, str(ROOT / "mtnlg" / "pretrain.py"), *argv]
        trainer = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

        def train_log() -> str:
            log.seek(0)
            return log.read()[-4000:]

        try:
            # the run ends and lingers: its last record is written, the endpoint still up
            wait_until(lambda: "stays up 30 s" in train_log() or trainer.poll() is not None,
                       train_log, timeout=120)  # fmt: skip
            assert trainer.poll() is None, train_log()
            last = read_metrics(str(metrics), "train")[-1]
            assert last["iteration"] == ITERS
            wait_until(lambda: target_up(url, "mtnlg-train"), lambda: query(url, "up"))

            def loss_scraped() -> bool:
                got = query(url, 'mtnlg:train_loss{job="mtnlg-train"}')
                return bool(got) and got[0][1] == pytest.approx(last["loss"], rel=1e-6)

            wait_until(loss_scraped, lambda: (query(url, "mtnlg:train_loss"), last["loss"]))
            [(_, iterations)] = query(url, "mtnlg:train_iterations_total")
            assert iterations == ITERS
            [(_, tokens)] = query(url, "mtnlg:train_consumed_tokens_total")
            assert tokens == last["consumed_tokens"]
            [(_, steps)] = query(url, "mtnlg:train_step_time_seconds_count")
            assert steps == ITERS
            _dashboard_queries_parse(url)
            t0 = time.monotonic()
            trainer.send_signal(signal.SIGTERM)  # ends the linger: a normal exit
            assert trainer.wait(timeout=DEADLINE_S) == 0, train_log()
            assert time.monotonic() - t0 < 15
        finally:
            if trainer.poll() is None:
                stop(trainer)
            log.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Hugging Face GPT-2 converted to an mtnlg checkpoint (TP1, PP1)."""
    from mtnlg.checkpoint.convert import hf_to_mtnlg
    from tests.inference.gen_helpers import make_hf_gpt2

    tmp = tmp_path_factory.mktemp("server_ckpt")
    make_hf_gpt2(tmp / "hf")
    hf_to_mtnlg(str(tmp / "hf"), str(tmp / "ckpt"), tp=1, pp=1)
    return tmp / "ckpt"


@pytest.mark.timeout(240)
def test_prometheus_scrapes_server(checkpoint, tmp_path):
    from tests.inference.server_helpers import serving

    port = free_port()
    cmd = [sys.executable, SERVER, "--load", str(checkpoint), "--port", str(port)]
    with serving(cmd + ["--log-level", "warning"], tmp_path) as (server, _):
        r = httpx.get(server + "/metrics", timeout=10)
        assert r.status_code == 200 and "mtnlg:generation_tokens_total" in r.text, r.text[:500]
        with prometheus(tmp_path, {"mtnlg-server": f"127.0.0.1:{port}"}) as url:
            completion = 0
            for prompt, n in (("To be, or not to be", 6), ("Hello", 4)):
                body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
                answer = httpx.post(server + "/v1/completions", json=body, timeout=60)
                assert answer.status_code == 200, answer.text
                completion += answer.json()["usage"]["completion_tokens"]
            assert completion > 0
            wait_until(lambda: target_up(url, "mtnlg-server"), lambda: query(url, "up"))

            def generated() -> float | None:
                got = query(url, 'sum(mtnlg:generation_tokens_total{job="mtnlg-server"})')
                return got and got[0][1] == completion

            wait_until(generated, lambda: (query(url, "mtnlg:generation_tokens_total"), completion))
            [(labels, finished)] = query(url, "sum by (model_name) (mtnlg:request_success_total)")
            assert finished == 2 and labels.get("model_name"), labels
