"""Preemption: Megatron's ``--exit-signal-handler``.

A scheduler that preempts a job (SLURM on preemption or at the time limit, Kubernetes on
eviction) sends SIGTERM and, after a grace period, SIGKILL. With ``--exit-signal-handler`` the
signal (``--exit-signal``, default SIGTERM) only sets a flag; at the next iteration boundary the
ranks agree on stopping (one all-reduce of one integer per iteration, only when the flag is on),
save a checkpoint and leave the loop, so the process exits 0 and ``--load`` resumes exactly.

Every rank must stop at the same iteration, or the ones still training would wait in a
collective until the distributed timeout: a signal that reached only some ranks (one node, one
process) is made everyone's by the all-reduce (MAX), so all ranks stop after the same step.

Under the ``deepspeed`` launcher (``deepspeed/launcher/launch.py``) a SIGTERM to the per-node
launcher is forwarded to every rank (``terminate_process_tree``: SIGTERM, then SIGKILL after
30 s), which is what lets the ranks save; the launcher itself then exits 1 whatever the ranks
return, and the single-node ``deepspeed`` runner installs no handler at all (it dies of the
signal and forwards nothing). SIGTERM to the ranks only ends the job with the launcher's exit
status 0. docs/faults.md has the full table.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from mtnlg.distributed.init import init_distributed, shutdown

SIGNAL_NAMES = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")
"""``--exit-signal`` choices: the signals a scheduler or a user sends to ask for a stop."""


class ExitSignalHandler:
    """Records ``sig`` instead of dying of it; :meth:`should_exit` asks every rank at once.

    A context manager: the previous handler is back once the ``with`` block ends. Install it
    before the slow setup (model build, ``--load``): a signal that arrives then is acted on at
    the first iteration boundary."""

    def __init__(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.sig = signal.Signals(sig)
        self.received = False
        self._previous = None

    def _handle(self, signum, frame) -> None:  # runs in the main thread between bytecodes
        self.received = True

    def __enter__(self) -> ExitSignalHandler:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(self.sig, self._previous)
            self._previous = None

    def should_exit(self, device: torch.device, group=None) -> bool:
        """Whether any rank of ``group`` (default: the world) has received the signal.

        Collective: every rank of ``group`` calls it at the same iteration boundary."""
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return self.received
        flag = torch.tensor([int(self.received)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())


def exit_signal_handler(args) -> ExitSignalHandler | None:
    """The handler ``--exit-signal-handler`` asks for (None without the flag)."""
    if not getattr(args, "exit_signal_handler", False):
        return None
    return ExitSignalHandler(signal.Signals[args.exit_signal])


@contextmanager
def training_session(args) -> Iterator[ExitSignalHandler | None]:
    """The distributed part of a training entry point: ``--exit-signal-handler`` installed first
    (a signal during the slow setup is acted on at the first iteration boundary), the process
    group with ``--distributed-timeout-minutes``, and its shutdown, which skips the final
    barrier after a failure (a dead peer would make it wait a whole timeout). Yields the
    handler (None without the flag) for ``train(exit_signal=...)``."""
    handler = exit_signal_handler(args)
    with handler or nullcontext():
        init_distributed(args.distributed_timeout_minutes)
        try:
            yield handler
        except BaseException:
            shutdown(barrier=False)
            raise
        shutdown()
