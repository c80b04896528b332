"""Start torch.distributed the same way under every launcher.

``deepspeed --hostfile``, ``torchrun`` and ``mpirun`` (through mpi4py discovery) all end here.
The backend comes from DeepSpeed's accelerator abstraction: NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch


def init_distributed(timeout_minutes: float = 10.0) -> None:
    """Initialise the default process group once (idempotent) and pin this rank's device.

    ``timeout_minutes`` (``--distributed-timeout-minutes``, Megatron's default 10): how long a
    collective may wait for a peer before it fails, so the ranks that survive a lost or hung
    peer exit instead of hanging (gloo raises; NCCL's watchdog aborts the process)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    launched = any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))
    if not dist.is_initialized() and not launched:
        # A plain `python script.py`: one process, no launcher, no MPI probing.
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
            }
        )
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=acc.communication_backend_name(),
            auto_mpi_discovery=True,
            # mpirun: the MPI discovery sets MASTER_PORT to this, not to the environment's
            distributed_port=int(os.environ.get("MASTER_PORT", "29500")),
            timeout=timedelta(minutes=timeout_minutes),
            verbose=False,
        )
        default_group_timeout(timedelta(minutes=timeout_minutes))
        release_shm_workspace()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)


def default_group_timeout(timeout: timedelta) -> None:
    """Give every process group created from now on ``timeout``, as the world group has.

    DeepSpeed builds the TP / PP / DP groups (``PipelineParallelGrid``, ZeRO) with
    ``new_group(ranks)`` and no timeout, so torch gives them its module default (30 min on
    gloo) whatever ``init_process_group`` was told: a peer lost mid-step would then hang the
    others in a TP all-reduce for 30 minutes. torch reads that default from a module global
    at each ``new_group``; setting it is the one way short of changing DeepSpeed."""
    from torch.distributed import distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if hasattr(c10d, name):
            setattr(c10d, name, timeout)


def shm_workspace_path(rank: int) -> str:
    """The /dev/shm file DeepSpeed's CPU shm all-reduce creates for ``rank`` (0.19 naming)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_workspace() -> bool:
    """Unlink this rank's DeepSpeed shm all-reduce workspace once every rank has mapped it.

    On the CPU accelerator with all ranks on one host (``LOCAL_SIZE == WORLD_SIZE``, as the
    ``deepspeed`` launcher sets), DeepSpeed creates a 69 MB /dev/shm file per rank and never
    removes it: every run leaks ``world_size x 69 MB`` of RAM until reboot. Each rank maps all
    peers' files during init, so after a barrier the names can go; the mappings stay valid.
    Returns whether a file was removed.
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    world = os.environ.get("WORLD_SIZE", "")
    if get_accelerator().device_name() != "cpu" or os.environ.get("LOCAL_SIZE") != world:
        return False
    dist.barrier()
    path = shm_workspace_path(dist.get_rank())
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def current_device() -> torch.device:
    """This rank's device through the accelerator (``cuda:N`` on GPUs, ``cpu`` on the CPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(acc.current_device()))


def shutdown(barrier: bool = True) -> None:
    """Barrier then destroy the default group: exiting without it aborts ranks at random.

    ``barrier=False`` on the way out of a failure: a peer that died would make the barrier wait
    a whole ``--distributed-timeout-minutes`` before this rank could exit."""
    import torch.distributed as dist

    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
