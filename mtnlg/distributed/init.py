"""Start torch.distributed the same way under every launcher.

``deepspeed --hostfile``, ``torchrun`` and ``mpirun`` (through mpi4py discovery) all end here.
The backend comes from DeepSpeed's accelerator abstraction: NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Initialise the default process group once (idempotent) and pin this rank's device."""
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
            timeout=timedelta(minutes=timeout_minutes),
            verbose=False,
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)


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


def shutdown() -> None:
    """Barrier then destroy the default group: exiting without it aborts ranks at random."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
