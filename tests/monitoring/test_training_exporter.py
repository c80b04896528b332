"""The trainer's exporter fed through ``MetricsLogger``: gauges, counters that never decrease,
the step-time histogram, the HTTP endpoint (a port in use is a clear error, rank != 0 opens
none), the linger that SIGTERM ends, and the flags on the shared parser."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mtnlg.monitoring.training import TrainingExporter
from mtnlg.training.metrics import MetricsLogger


def scrape(url: str) -> dict[str, float]:
    """Unlabelled sample name -> value from a live endpoint."""
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200
    return {
        s.name: s.value
        for f in text_string_to_metric_families(r.text)
        for s in f.samples
        if not s.labels
    }


def _args(tmp_path, **kw) -> argparse.Namespace:
    base = dict(metrics_file=str(tmp_path / "m.jsonl"), tensorboard_dir=None, log_interval=5,
                metrics_port=0, metrics_host="127.0.0.1", metrics_linger=0.0)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def _fields(tokens: int, skipped: int, loss: float = 2.5) -> dict:
    return {"consumed_tokens": tokens, "loss": loss, "lr": 1e-3, "grad_norm": None,
            "skipped_iters": skipped, "tokens_per_sec": 1000.0, "tflops_per_gpu": 0.5,
            "mfu": 0.25, "loss_scale": 1024.0}  # fmt: skip


def test_logger_feeds_the_endpoint(tmp_path):
    logger = MetricsLogger.from_args(_args(tmp_path), enabled=True)
    url = logger._exporter.url
    logger.log_train(5, _fields(640, 0))
    logger.log_train(10, _fields(1280, 1, loss=2.25))
    logger.log_eval(10, {"val_loss": 9.0})  # evaluation records are not exported
    s = scrape(url)
    assert s["mtnlg:train_loss"] == 2.25
    assert s["mtnlg:train_lr"] == 1e-3
    assert "mtnlg:train_grad_norm" not in s  # only None logged: no series, not a false 0
    assert s["mtnlg:train_tokens_per_second"] == 1000.0
    assert s["mtnlg:train_tflops"] == 0.5 and s["mtnlg:train_mfu"] == 0.25
    assert s["mtnlg:train_loss_scale"] == 1024.0
    assert abs(s["mtnlg:train_last_step_timestamp_seconds"] - time.time()) < 60
    assert s["mtnlg:train_iterations_total"] == 10
    assert s["mtnlg:train_consumed_tokens_total"] == 1280
    assert s["mtnlg:train_skipped_steps_total"] == 1
    assert s["mtnlg:train_step_time_seconds_count"] == 10  # one sample per iteration
    # Prometheus asks for OpenMetrics first: the answer still names the series mtnlg:...
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    r = httpx.get(url, headers={"Accept": accept}, timeout=10)
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "\nmtnlg:train_loss 2.25\n" in r.text and "mtnlg_" not in r.text
    logger.close()
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=2)
    record = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[1])
    assert record["loss"] == 2.25 and record["iteration"] == 10  # JSONL unchanged


def test_counters_never_decrease_and_resume():
    ex = TrainingExporter(log_interval=10)
    ex.observe(110, {"consumed_tokens": 11000, "skipped_iters": 2})  # a resumed run
    ex.observe(105, {"consumed_tokens": 10500, "skipped_iters": 0})  # going back: no change
    ex.observe(120, {"consumed_tokens": 12000})  # no skipped_iters: that counter untouched
    got = {s.name: s.value for m in ex.registry.collect() for s in m.samples}
    assert "mtnlg:train_loss" not in got and "mtnlg:train_mfu" not in got  # never logged
    assert got["mtnlg:train_iterations_total"] == 120
    assert got["mtnlg:train_consumed_tokens_total"] == 12000
    assert got["mtnlg:train_skipped_steps_total"] == 2
    # the first window counts --log-interval steps at most, the later ones their increments
    assert got["mtnlg:train_step_time_seconds_count"] == 10 + 0 + 10


def test_port_in_use_and_other_ranks(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit, match=f"--metrics-port {port}"):
            MetricsLogger.from_args(_args(tmp_path, metrics_port=port), enabled=True)
        other = MetricsLogger.from_args(_args(tmp_path, metrics_port=port), enabled=False)
        assert other._exporter is None  # rank != 0: no port, no error
        other.log_train(1, _fields(64, 0))
        other.close()
    off = MetricsLogger.from_args(_args(tmp_path, metrics_port=None), enabled=True)
    assert off._exporter is None  # the default: no endpoint
    off.close()


def test_linger_keeps_serving_until_sigterm(tmp_path):
    logger = MetricsLogger.from_args(_args(tmp_path, metrics_linger=30.0), enabled=True)
    url = logger._exporter.url
    logger.log_train(5, _fields(640, 0))
    seen = {}

    def scrape_then_term() -> None:
        time.sleep(0.3)
        seen.update(scrape(url))  # still up after the run's end
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=scrape_then_term, daemon=True).start()
    t0 = time.monotonic()
    logger.close()  # lingers until the SIGTERM
    assert time.monotonic() - t0 < 10
    assert seen["mtnlg:train_iterations_total"] == 5
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is given back


def test_no_linger_when_failing(tmp_path):
    logger = MetricsLogger.from_args(_args(tmp_path, metrics_linger=30.0), enabled=True)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("training failed")
        finally:
            logger.close()  # an exception on its way out: no waiting
    assert time.monotonic() - t0 < 5


def test_flags_on_every_training_entry():
    """pretrain.py, finetune.py and distill.py build on the shared parser: all take the flags."""
    from mtnlg.distillation.driver import build_distill_parser
    from mtnlg.finetuning.arguments import build_finetune_parser
    from mtnlg.training.pretrain import build_pretrain_parser

    for build in (build_pretrain_parser, build_finetune_parser, build_distill_parser):
        text = build("x").format_help()
        for flag in ("--metrics-port PORT", "--metrics-host HOST", "--metrics-linger SECONDS"):
            assert flag in text, (build.__name__, flag)
    p = build_pretrain_parser("x")
    args = p.parse_args([])
    assert (args.metrics_port, args.metrics_host, args.metrics_linger) == (None, "127.0.0.1", 0.0)
    args = p.parse_args(["--metrics-port", "9100", "--metrics-host", "0.0.0.0",
                         "--metrics-linger", "30"])  # fmt: skip
    assert (args.metrics_port, args.metrics_host, args.metrics_linger) == (9100, "0.0.0.0", 30.0)
    text = p.format_help()
    assert "--metrics-port" in text and "--metrics-linger" in text and "pulls" in text
