"""Rank 0's generation thread: the waiting queue, admission into free slots, the step loop.

HTTP handlers :meth:`Scheduler.submit` a :class:`Job` (a request of one or more sequences: its
prompts x ``n``); more than ``--max-queue`` jobs not yet admitted are refused (429). The one
worker thread (the only one that tokenizes, communicates and generates) loops:

1. takes the new jobs, builds and checks their requests (a refused job is answered 4xx and never
   reaches the other ranks) and queues their sequences;
2. builds the step's :class:`~mtnlg.inference.batching.Plan`: the sequences of jobs whose client
   left are aborted, waiting sequences take the free slots in arrival order;
3. broadcasts the plan and runs :meth:`Batcher.step` like every other rank, posting each
   sequence's events to its job (on the job's event loop).

Idle, it blocks on the queue and, every ``ping_s``, broadcasts an empty plan: a rank that is
gone then fails the broadcast and ``/health`` answers 503 until the server stops.

Failures stay with their request: unusable logits end that sequence with ``"error"`` on every
rank alike; on one process an exception in a prefill fails that sequence alone (``"failed"``)
and one in a decode step the sequences of that step; with several ranks an exception cannot be
undone there (a peer may be blocked in a collective): every job gets a 500 or 503 and the server
stops, so that the launcher ends every rank.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.distributed as dist

from mtnlg.inference.batching import Batcher, Event, Plan
from mtnlg.inference.engine import RequestError, check_requests
from mtnlg.inference.errors import APIError, internal_error

log = logging.getLogger("uvicorn.error")


def send(plan: Plan) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list([plan], src=0)


def ping() -> None:
    """A round trip with every rank (rank 0's heartbeat when idle)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        send(Plan(ping=True))
        dist.barrier()


def receive() -> Plan:
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass(frozen=True)
class Limits:
    """What one request, and the queue, may hold (the server's ``--max-*`` flags)."""

    max_queue: int = 64
    """Requests waiting for a slot (not yet admitted); one more is answered 429."""
    max_prompt_bytes: int = 1 << 20
    """UTF-8 bytes of prompt text in one request (all its prompts together); more is a 400."""

    @property
    def max_body_bytes(self) -> int:
        """Raw request body cap (413): room for the prompt text JSON-escaped (up to 6 bytes
        per byte, ``\\u0001``) plus 64 KiB for the other fields."""
        return 6 * self.max_prompt_bytes + (64 << 10)


@dataclass
class Job:
    """One HTTP request. ``build()`` (on the worker) gives its requests, one per sequence.

    Its event loop receives, in order: ``("accepted", requests)`` or ``("refused", APIError)``,
    then ``("event", choice, Event)`` per token and ending, or ``("failed", APIError)``."""

    build: Callable
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    unadmitted: int = 0

    def post(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass
class _Waiting:
    job: Job
    choice: int
    request: object


class Scheduler:
    def __init__(self, batcher: Batcher, limits: Limits = Limits(), metrics=None, ping_s=60.0):
        self.batcher, self.limits, self.metrics, self.ping_s = batcher, limits, metrics, ping_s
        self.jobs: queue.Queue = queue.Queue()
        self.multi_rank = dist.is_initialized() and dist.get_world_size() > 1
        self.failed = False
        self.busy = False
        self.on_failure: Callable[[], None] = lambda: None
        self._waiting = 0  # jobs submitted and not wholly admitted (nor answered)
        self._lock = threading.Lock()
        self._pending: deque[_Waiting] = deque()
        self._owners: dict[int, tuple[Job, int]] = {}
        self._next_seq = 0

    # ---- the event loop's side
    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return len(self.batcher.running)

    def submit(self, job: Job) -> None:
        """Queue ``job`` (429 when --max-queue jobs already wait; 503 once stopping)."""
        if self.failed:
            raise APIError(503, "the server is stopping after a generation failure")
        with self._lock:
            if self._waiting >= self.limits.max_queue:
                raise APIError(
                    429,
                    f"the server is busy: {self.limits.max_queue} requests are already waiting "
                    "(--max-queue); retry later",
                    code="rate_limit_exceeded",
                    kind="rate_limit_error",
                    headers={"retry-after": "1"},
                )
            self._waiting += 1
        self.jobs.put(job)

    def _done_waiting(self, job: Job) -> None:
        with self._lock:
            self._waiting -= 1

    # ---- the worker thread
    def run(self) -> None:
        stopping, last = False, time.monotonic()
        while True:
            idle = not self.batcher.running and not self._pending
            if idle and stopping:
                send(Plan(stop=True))
                return
            stopping |= self._intake(block=idle and not stopping)
            plan = self._plan()
            if plan.empty and not self.batcher.running:
                if time.monotonic() - last >= self.ping_s:
                    last = time.monotonic()
                    if not self._safely(ping):
                        return
                continue
            last = time.monotonic()
            self.busy = True
            ok = self._safely(self._step, plan)
            self.busy = False
            if not ok:
                return

    def _safely(self, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception:  # noqa: BLE001 - a bug, or a broken process group
            log.exception("the generation thread failed")
            if not self.multi_rank:
                for seq in self.batcher.reset():
                    self._emit(Event(seq, None, finish="failed"))
                return True
            self._stop()
            return False

    def _step(self, plan: Plan) -> None:
        send(plan)
        self.batcher.step(plan, self._emit, isolate=not self.multi_rank)
        if self.metrics is not None:  # sequences in slots / waiting (a job not yet read: 1)
            self.metrics.set_queue(self.running, len(self._pending) + self.jobs.qsize())

    def _intake(self, block: bool) -> bool:
        """Take the queued jobs (waiting up to ``ping_s`` for one when ``block``); True once
        the shutdown message (None) came."""
        while True:
            try:
                job = self.jobs.get(timeout=self.ping_s) if block else self.jobs.get_nowait()
            except queue.Empty:
                return False
            block = False
            if job is None:
                return True
            self._accept(job)

    def _accept(self, job: Job) -> None:
        if job.cancelled:
            self._done_waiting(job)
            return
        try:
            reqs = job.build()
            check_requests(reqs, self.batcher.engine.cfg)
            self._fits(reqs)
        except APIError as e:
            self._done_waiting(job)
            job.post(("refused", e))
            return
        except RequestError as e:
            self._done_waiting(job)
            job.post(("refused", APIError(400, e.reason, "prompt")))
            return
        except Exception:  # noqa: BLE001 - answered, never reaches the other ranks
            log.exception("preparing a request failed")
            self._done_waiting(job)
            job.post(("refused", internal_error()))
            return
        job.unadmitted = len(reqs)
        job.post(("accepted", reqs))
        for choice, r in enumerate(reqs):
            if self.metrics is not None:  # every sequence (choice) is a request to them
                self.metrics.on_arrival((id(job), choice), job.arrival)
            self._pending.append(_Waiting(job, choice, r))

    def _fits(self, reqs) -> None:
        length = self.batcher.length
        for i, r in enumerate(reqs):
            n = len(r.prompt_tokens) + r.params.max_new_tokens
            if n > length:
                raise APIError(
                    400,
                    f"prompt {i}: {len(r.prompt_tokens)} tokens + max_tokens "
                    f"{r.params.max_new_tokens} = {n} exceeds this server's slot length of "
                    f"{length} tokens (--max-model-len)",
                    "max_tokens",
                    "context_length_exceeded",
                )

    def _plan(self) -> Plan:
        plan = Plan()
        for seq, (job, _) in self._owners.items():
            if job.cancelled and seq in self.batcher.running:
                plan.abort.append(seq)
        kept = deque()
        for w in self._pending:
            if w.job.cancelled:  # its client left before it got a slot
                self._admitted(w.job)
                if self.metrics is not None:
                    self.metrics.on_finish((id(w.job), w.choice), "abort")
            else:
                kept.append(w)
        self._pending = kept
        free = list(self.batcher.free)
        while self._pending and free:
            w = self._pending.popleft()
            seq, self._next_seq = self._next_seq, self._next_seq + 1
            self._owners[seq] = (w.job, w.choice)
            plan.admit.append((seq, free.pop(), w.request))
            self._admitted(w.job)
            if self.metrics is not None:
                self.metrics.on_admit(len(w.request.prompt_tokens))
        return plan

    def _admitted(self, job: Job) -> None:
        job.unadmitted -= 1
        if job.unadmitted == 0:
            self._done_waiting(job)

    def _emit(self, ev: Event) -> None:
        owner = self._owners.get(ev.seq)
        if owner is None:
            return
        job, choice = owner
        now, key = time.monotonic(), (id(job), choice)
        if self.metrics is not None and ev.token is not None:
            self.metrics.on_token(key, now)
        if ev.finish is not None:
            del self._owners[ev.seq]
            if self.metrics is not None:
                self.metrics.on_finish(key, _reason(ev.finish), now)
        job.post(("event", choice, ev))

    def _stop(self) -> None:
        """Answer every job 500 (running) or 503 (waiting) and stop serving."""
        self.failed = True
        for job, choice in list(self._owners.values()):
            job.post(("failed", internal_error()))
            if self.metrics is not None:
                self.metrics.on_finish((id(job), choice), "error")
        self._owners.clear()
        stopping = APIError(503, "the server is stopping after a generation failure")
        for w in self._pending:
            w.job.post(("failed", stopping))
            if self.metrics is not None:
                self.metrics.on_finish((id(w.job), w.choice), "error")
        self._pending.clear()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.post(("refused", stopping))
        self.on_failure()


def _reason(finish: str) -> str:
    return {"eod": "stop", "failed": "error"}.get(finish, finish)


def follow(batcher: Batcher) -> None:
    """A non-zero rank: run every plan rank 0 broadcasts, until the stop plan."""
    while True:
        plan = receive()
        if plan.stop:
            return
        if plan.ping:
            dist.barrier()
        else:  # rank 0 sends a plan for every step it runs (an empty one: decode only)
            batcher.step(plan)
