"""The one helper that runs a test function on N spawned CPU processes over gloo.

Usage::

    def _body(rank, world_size, x):      # module-level, so spawn can import it
        ...
        return something_picklable

    results = run_distributed(_body, world_size=2, args=(x,), timeout=120)
    # results[rank] is what rank returned

Every child sets DS_ACCELERATOR=cpu, one intra-op thread, a fresh port, initialises the default
group through ``mtnlg.distributed.init``, and always runs ``barrier(); destroy_process_group()``.
A child's exception is re-raised in the parent with its traceback; a hang is killed at ``timeout``.

``start_method="forkserver"`` forks the children from a fork server (``multiprocessing``'s
start method) that imported torch, dynamo, inductor and DeepSpeed once per pytest session: every
rank of a DeepSpeed run imports them (torch's optimizer imports dynamo, DeepSpeed's ZeRO check
inductor), ~6.5 CPU-seconds that each spawned interpreter pays again (2 cores, 4-8 ranks per
run). The fork server is itself a fresh interpreter (not a fork of pytest), started with the
children's DS_ACCELERATOR; a child gets the parent's environment as it is at the call, as a
spawned one does. Tests that measure a rank's resident memory keep the default "spawn": a forked
child starts from the server's heap and mappings, and its VmHWM deltas were measured to vary
(a ZeRO-3 build-peak test failed 2 of 4 runs forked, none spawned).
``MTNLG_TEST_START_METHOD=spawn`` spawns every child whatever the call asks.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELOAD = ["torch", "torch._dynamo", "torch._inductor.compile_fx", "deepspeed"]
"""What the fork server imports once. Not transformers / datasets / huggingface_hub: they read
their environment (HF_HUB_OFFLINE, caches) into constants at import, and tests set it."""


def _context(method: str, env: dict[str, str]):
    """The start method's context; the fork server is started under the children's settings."""
    if os.environ.get("MTNLG_TEST_START_METHOD") == "spawn":
        method = "spawn"
    if method not in ("spawn", "forkserver"):
        raise ValueError(f"start_method {method!r}: 'spawn' or 'forkserver'")
    ctx = mp.get_context(method)
    if method == "forkserver":
        from multiprocessing import forkserver

        ctx.set_forkserver_preload(PRELOAD)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            forkserver.ensure_running()  # no-op once running
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return ctx


def _child(fn, rank, world_size, port, args, env, queue):
    os.environ.clear()  # the parent's environment at the call (the fork server has its own)
    os.environ.update(env)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
    )
    try:
        import torch

        torch.set_num_threads(int(env.get("MTNLG_TEST_THREADS", "1")))
        from mtnlg.distributed.init import init_distributed, shutdown

        init_distributed(timeout_minutes=5)
        out = fn(rank, world_size, *args)
        shutdown()
        # Plain pickle copies tensors into the bytes: torch's queue pickler would share memory
        # through file descriptors that die with this process.
        queue.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout: float = 180.0,
    threads: int = 1,
    start_method: str = "spawn",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return per-rank results.

    ``start_method``: "spawn" (fresh interpreters) or "forkserver" (see the module docstring)."""
    env = {
        "DS_ACCELERATOR": "cpu",
        "MTNLG_TEST_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
    }
    ctx = _context(start_method, env)
    queue = ctx.Queue()
    env = {**os.environ, **env}
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, env, queue), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"distributed test timed out after {timeout}s; "
                    f"ranks finished: {sorted(results)}"
                )
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and not errors:
                    # a child died without reporting (segfault, os._exit): give peers a moment
                    time.sleep(2.0)
                    if queue.empty():
                        raise RuntimeError(
                            "rank process died without reporting: exit codes "
                            f"{[p.exitcode for p in procs]}"
                        ) from None
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def deepspeed_cmd(script: str, argv: list, hostfile, num_gpus: int | None = None) -> list[str]:
    """The real ``deepspeed`` launcher (its runner module) on ``hostfile``, loopback, fresh port."""
    import sys

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile)]
    cmd += ["--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    if num_gpus is not None:
        cmd += ["--num_gpus", str(num_gpus)]
    return [*cmd, str(script), *map(str, argv)]
