"""A real Prometheus server for the tests: Debian's ``prometheus`` binary (not its system
service) started on a free loopback port with a throwaway config and storage, read through its
HTTP API. ``MTNLG_PROMETHEUS_REQUIRED=1`` (``.ci/run``) turns a missing binary into a failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.dist import free_port

DEADLINE_S = 60.0
"""Longest any poll waits."""


def prometheus_binary() -> str:
    """The ``prometheus`` executable; skips (or fails under MTNLG_PROMETHEUS_REQUIRED=1)."""
    found = shutil.which("prometheus")
    if found:
        return found
    msg = "no `prometheus` binary on PATH (Debian/Ubuntu: apt-get install prometheus)"
    if os.environ.get("MTNLG_PROMETHEUS_REQUIRED") == "1":
        pytest.fail(f"MTNLG_PROMETHEUS_REQUIRED=1 but {msg}")
    pytest.skip(f"{msg}; set MTNLG_PROMETHEUS_REQUIRED=1 to fail instead")


def config(jobs: dict[str, str]) -> str:
    """prometheus.yml scraping each ``job name -> host:port`` every second at /metrics."""
    text = "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
    for job, target in jobs.items():
        text += f"  - job_name: {job}\n    metrics_path: /metrics\n"
        text += f"    static_configs:\n      - targets: ['{target}']\n"
    return text


@contextlib.contextmanager
def prometheus(tmp: Path, jobs: dict[str, str]):
    """A Prometheus scraping ``jobs``; yields its base URL once ``/-/ready`` answers 200."""
    binary = prometheus_binary()
    (tmp / "prometheus.yml").write_text(config(jobs))
    port = free_port()
    cmd = [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]  # fmt: skip
    log = open(tmp / "prometheus.log", "w+")  # noqa: SIM115 - read back on failure
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(
                    f"prometheus did not start (rc {proc.returncode}):\n{log.read()[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def api(url: str, path: str, **params) -> dict:
    r = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]


def query(url: str, promql: str) -> list[tuple[dict, float]]:
    """(labels, value) of each series of an instant query."""
    data = api(url, "query", query=promql)
    return [(s["metric"], float(s["value"][1])) for s in data["result"]]


def wait_until(what, describe, timeout: float = DEADLINE_S):
    """Poll ``what()`` until it returns a truthy value (returned); fail with ``describe()``."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {describe()}")
        time.sleep(0.25)


def target_up(url: str, job: str) -> bool:
    targets = api(url, "targets", state="active")["activeTargets"]
    return any(t["labels"]["job"] == job and t["health"] == "up" for t in targets)
