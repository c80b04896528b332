"""Rank 0's side of the server: the FastAPI app, its bounded queue and the one generation thread.

Handlers validate the body (pydantic; the raw body is capped before it is parsed, the prompt
text in bytes before it is tokenized) and queue a :class:`Job`; a full queue answers 429. The
worker thread drains the queue, tokenizes and checks each job (a refused job is answered 4xx and
never reaches the other ranks), broadcasts the accepted requests together (``("generate",
requests)``; ``("ping", None)`` when idle, ``("stop", None)`` at shutdown) and generates.

Failures stay with their request:

- a sequence whose logits are unusable (NaN/inf) ends with ``"error"`` on every rank alike (the
  sampler's ``INVALID`` token is broadcast like any other): that job gets a 500, the rest of the
  batch is answered normally and the ranks stay in step;
- an exception inside generation on one process: the batch's jobs are run again one by one, so
  only the failing one gets a 500; the server keeps serving;
- an exception inside generation with several ranks cannot be undone there (the peers may be
  blocked in a collective): the batch gets 500s and the server stops (``serve`` returns False)
  so that the launcher ends every rank instead of leaving them hanging.

No answer carries an exception's text or a traceback: those go to the log (``uvicorn.error``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch.distributed as dist
from fastapi import FastAPI

from mtnlg.inference import api
from mtnlg.inference.engine import RequestError, check_requests
from mtnlg.inference.errors import install_error_handlers

SIGNALS = (signal.SIGINT, signal.SIGTERM)
PING = object()
"""What the worker handles when idle for ``ping_s``: a no-op broadcast to the other ranks."""
log = logging.getLogger("uvicorn.error")


def send(kind: str, requests=None) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list([(kind, requests)], src=0)


def receive() -> tuple[str, list | None]:
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass(frozen=True)
class Limits:
    """What one request, and the queue, may hold (the server's ``--max-*`` flags)."""

    max_queue: int = 64
    """HTTP requests waiting for the generation thread; one more is answered 429."""
    max_prompt_bytes: int = 1 << 20
    """UTF-8 bytes of prompt text in one request (all its prompts together); more is a 400."""

    @property
    def max_body_bytes(self) -> int:
        """Raw request body cap (413): room for the prompt text JSON-escaped (up to 6 bytes
        per byte, ``\\u0001``) plus 64 KiB for the other fields."""
        return 6 * self.max_prompt_bytes + (64 << 10)


@dataclass
class Job:
    """``build()`` gives the requests; ``respond(requests, results)`` the answer."""

    build: Callable
    respond: Callable
    per_prompt: int = 1
    future: Future = field(default_factory=Future)


class Server:
    def __init__(
        self, engine, model_name: str, batch_size: int, limits: Limits = Limits(), ping_s=60.0
    ):
        self.engine, self.name = engine, model_name
        self.batch_size, self.ping_s, self.limits = batch_size, ping_s, limits
        self.jobs: queue.Queue = queue.Queue(maxsize=limits.max_queue)
        self.multi_rank = dist.is_initialized() and dist.get_world_size() > 1
        self.failed = False
        self.busy = False
        self.uvicorn = None
        self.app = self._app()

    # ---- the worker thread (the only thread that tokenizes, communicates and generates)
    def _work(self) -> None:
        while True:
            try:
                first = self.jobs.get(timeout=self.ping_s)
            except queue.Empty:
                first = PING
            jobs, stop = self._drain(first)
            try:
                if first is PING:
                    send("ping")
                self._run(jobs)
                if stop:
                    send("stop")
                    return
            except Exception:  # noqa: BLE001 - a bug, or a broken process group
                log.exception("the generation thread failed")
                if self.multi_rank:  # the ranks may be out of step: stop them all
                    self._stop(jobs)
                else:
                    self._fail(jobs, api.internal_error())
            if self.failed:  # the other ranks may be stuck: send nothing more
                return

    def _drain(self, first) -> tuple[list[Job], bool]:
        """``first`` and every job already waiting (they are generated together); whether the
        shutdown message (None) came with them."""
        if first is PING:
            return [], False
        jobs, stop = [], first is None
        if not stop:
            jobs.append(first)
        while not stop:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            stop = job is None
            if not stop:
                jobs.append(job)
        return jobs, stop

    @staticmethod
    def _fail(jobs: list[Job], error: api.APIError) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    def _stop(self, jobs: list[Job]) -> None:
        """Answer ``jobs`` 500, the ones still queued 503, and stop serving (rank 0 then exits
        non-zero, so that the launcher ends every rank)."""
        self.failed = True
        self._fail(jobs, api.internal_error())
        queued, _ = self._drain(PING if self.jobs.empty() else self.jobs.get_nowait())
        self._fail(queued, api.APIError(503, "the server is stopping after a generation failure"))
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True

    def _run(self, jobs: list[Job]) -> None:
        ready = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():  # its client is gone
                continue
            try:
                reqs = job.build()
                check_requests(reqs, self.engine.cfg)
                ready.append((job, reqs))
            except api.APIError as e:
                job.future.set_exception(e)
            except RequestError as e:
                msg = f"prompt {e.index // job.per_prompt}: {e.reason}"
                job.future.set_exception(api.APIError(400, msg, "prompt"))
            except Exception:  # noqa: BLE001 - answered, never reaches the other ranks
                log.exception("preparing a request failed")
                job.future.set_exception(api.internal_error())
        if ready:
            self.busy = True
            try:
                self._generate(ready)
            finally:
                self.busy = False

    def _generate(self, ready: list) -> None:
        requests = [r for _, reqs in ready for r in reqs]
        try:
            send("generate", requests)
            results = self.engine.generate(requests, batch_size=self.batch_size)
        except Exception:  # noqa: BLE001
            log.exception("generation failed (%d requests, %d jobs)", len(requests), len(ready))
            if self.multi_rank:
                self._stop([job for job, _ in ready])
            elif len(ready) > 1:  # one process, nothing to resync: find the failing job
                for one in ready:
                    self._generate([one])
            else:
                self._fail([ready[0][0]], api.internal_error())
            return
        lo = 0
        for job, reqs in ready:
            part = results[lo : lo + len(reqs)]
            lo += len(reqs)
            if any(r.finish_reason == "error" for r in part):
                log.error("a request's logits were not finite (NaN or inf): answered 500")
                msg = "generation failed for this request: the model's logits were not finite"
                job.future.set_exception(api.APIError(500, msg))
                continue
            try:
                job.future.set_result(job.respond(reqs, part))
            except Exception:  # noqa: BLE001
                log.exception("building an answer failed")
                job.future.set_exception(api.internal_error())

    async def submit(self, job: Job):
        if self.failed:
            raise api.APIError(503, "the server is stopping after a generation failure")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise api.APIError(
                429,
                f"the server is busy: {self.limits.max_queue} requests are already waiting "
                "(--max-queue); retry later",
                code="rate_limit_exceeded",
                kind="rate_limit_error",
                headers={"retry-after": "1"},
            ) from None
        return await asyncio.wrap_future(job.future)

    # ---- HTTP
    def _app(self) -> FastAPI:
        app = FastAPI(
            title="mtnlg",
            docs_url=None,
            redoc_url=None,
            openapi_url=None,
        )
        install_error_handlers(app, self.limits.max_body_bytes)
        tok = self.engine.tokenizer
        limit = self.engine.cfg.max_position_embeddings
        max_bytes = self.limits.max_prompt_bytes

        @app.get("/health")
        async def health():
            if self.failed:
                raise api.APIError(503, "generation failed; the server is stopping")
            return {"status": "ok", "waiting": self.jobs.qsize(), "busy": self.busy}

        @app.get("/v1/models")
        async def models():
            card = {"id": self.name, "object": "model", "created": int(time.time())}
            card.update(owned_by="mtnlg", max_model_len=limit)
            return {"object": "list", "data": [card]}

        @app.post("/v1/completions")
        async def completions(body: api.CompletionRequest):
            if body.model is not None and body.model != self.name:
                msg = f"model {body.model!r} is not served here ({self.name!r})"
                raise api.APIError(404, msg, "model", "model_not_found")
            api.check_prompt_bytes(body.prompts, max_bytes, "prompt")
            job = Job(
                lambda: api.completion_requests(body, tok.tokenize, limit),
                lambda reqs, res: api.completion_response(self.name, reqs, res, body.n),
                per_prompt=body.n,
            )
            return await self.submit(job)

        @app.put("/api")
        async def megatron(body: api.MegatronRequest):
            api.check_prompt_bytes(body.prompts, max_bytes, "prompts")
            job = Job(
                lambda: api.megatron_requests(body, tok.tokenize, limit),
                lambda _reqs, res: api.megatron_response(body.prompts, res, tok.detokenize),
            )
            return await self.submit(job)

        return app

    def serve(self, host: str, port: int, log_level: str = "info") -> bool:
        """Serve until SIGINT/SIGTERM (or a generation failure with several ranks: False)."""
        import uvicorn

        worker = threading.Thread(target=self._work, name="generate", daemon=True)
        worker.start()
        config = uvicorn.Config(self.app, host=host, port=port, log_level=log_level)
        self.uvicorn = uvicorn.Server(config)
        # uvicorn re-raises the SIGINT/SIGTERM it shut down on: record it instead, so that the
        # other ranks still get the shutdown message and the job ends cleanly
        stopped = []
        old = {s: signal.signal(s, lambda n, _: stopped.append(n)) for s in SIGNALS}
        try:
            print(f"mtnlg server: http://{host}:{port} (model {self.name!r})", flush=True)
            self.uvicorn.run()
        finally:
            if not self.failed:
                self.jobs.put(None)  # after the jobs already queued: they are answered first
                worker.join()
            for s, handler in old.items():
                signal.signal(s, handler)
        return not self.failed
