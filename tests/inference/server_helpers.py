"""Shared pieces of the server tests: start a real server process on 127.0.0.1 and wait for it;
a server with test-only faults injected (a gate that holds the generation thread, a failing
generation, NaN logits for one request)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.dist import free_port
from tests.inference.gen_helpers import ROOT


def env() -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return env


@contextlib.contextmanager
def serving(cmd: list[str], cwd, timeout: float = 120.0):
    """Start the server command in its own process group; (URL, process) once /health answers."""
    log = open(cwd / "server.log", "w+")  # noqa: SIM115 - read back on failure
    proc = subprocess.Popen(
        cmd, env=env(), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"server did not start (rc {proc.returncode}):\n{log.read()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


FAULTS = """
import os, sys, time
sys.path.insert(0, {root!r})
from mtnlg.inference import batching
real_step, real_prefill, real_sample = (
    batching.Batcher.step, batching.Batcher._prefill, batching.sample
)
ARGS = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # deepspeed adds it
GATE = ARGS.pop(0)  # while this file exists, a generation step waits (the test holds the worker)


def step(self, plan, *args, **kw):
    while os.path.exists(GATE):
        time.sleep(0.02)
    return real_step(self, plan, *args, **kw)


def prefill(self, seq, slot, request, emit):  # fails on rank 0 for a request of 7 tokens
    if os.environ.get("RANK", "0") == "0" and request.params.max_new_tokens == 7:
        raise RuntimeError("injected failure SECRET-1234")
    return real_prefill(self, seq, slot, request, emit)


def sample(logits, params, gens):  # the sequences seeded 666 get NaN logits
    logits = logits.clone()
    for i, p in enumerate(params):
        if p.seed == 666:
            logits[i] = float("nan")
    return real_sample(logits, params, gens)


batching.Batcher.step, batching.Batcher._prefill, batching.sample = step, prefill, sample
from mtnlg.inference.server import main
main(ARGS)
"""


def faulty_script(tmp: Path) -> Path:
    """A server script with :data:`FAULTS` injected; its first argument is the gate file."""
    script = tmp / "faulty_server.py"
    script.write_text(FAULTS.format(root=str(ROOT)))
    return script


def faulty_server_cmd(tmp: Path, load: Path, gate: Path, *args: str) -> list[str]:
    """One-process server with :data:`FAULTS` injected; ``args`` are extra server flags."""
    cmd = [sys.executable, str(faulty_script(tmp)), str(gate), "--load", str(load)]
    return cmd + ["--port", str(free_port()), "--log-level", "warning", *args]


def wait_for(url: str, what, timeout: float = 60.0) -> dict:
    """Poll /health until ``what(health)`` holds; the last /health answer."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health", timeout=10).json()
        if what(health):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.02)
