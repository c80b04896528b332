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


def _child(fn, rank, world_size, port, args, env, queue):
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
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return per-rank results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    env = {
        "DS_ACCELERATOR": "cpu",
        "MTNLG_TEST_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
    }
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
