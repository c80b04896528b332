"""Rank 0's side of the server: the FastAPI app, its queue and the one generation thread.

Handlers only validate the body (pydantic) and queue a :class:`Job`; the worker thread drains
the queue, tokenizes and checks each job (a refused job is answered 4xx and never reaches the
other ranks), broadcasts the accepted requests together (``("generate", requests)``; or
``("ping", None)`` when idle, ``("stop", None)`` at shutdown) and generates. A failure inside
generation cannot be undone on the other ranks, so it answers 500 and stops the server.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch.distributed as dist
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from mtnlg.inference import api
from mtnlg.inference.engine import RequestError, check_requests

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def send(kind: str, requests=None) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list([(kind, requests)], src=0)


def receive() -> tuple[str, list | None]:
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class Job:
    """``build(tokenizer)`` gives the requests; ``respond(requests, results)`` the answer."""

    build: Callable
    respond: Callable
    per_prompt: int = 1
    future: Future = field(default_factory=Future)


class Server:
    def __init__(self, engine, model_name: str, batch_size: int, ping_s: float = 60.0):
        self.engine, self.name = engine, model_name
        self.batch_size, self.ping_s = batch_size, ping_s
        self.jobs: queue.Queue = queue.Queue()
        self.failed: BaseException | None = None
        self.uvicorn = None
        self.app = self._app()

    # ---- the worker thread (the only thread that tokenizes, communicates and generates)
    def _work(self) -> None:
        while True:
            try:
                first = self.jobs.get(timeout=self.ping_s)
            except queue.Empty:
                send("ping")
                continue
            batch, stop = [first], first is None
            while not stop:  # every job already waiting joins this batch
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                stop = job is None
                if not stop:
                    batch.append(job)
            self._run([j for j in batch if j is not None])
            if self.failed is not None:  # the other ranks may be stuck: send nothing more
                return
            if stop:
                send("stop")
                return

    def _run(self, jobs: list[Job]) -> None:
        ready = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():  # its client is gone
                continue
            try:
                reqs = job.build(self.engine.tokenizer)
                check_requests(reqs, self.engine.cfg)
                ready.append((job, reqs))
            except RequestError as e:
                job.future.set_exception(
                    api.APIError(400, f"prompt {e.index // job.per_prompt}: {e.reason}", "prompt")
                )
            except Exception as e:  # noqa: BLE001 - answered, never reaches the other ranks
                job.future.set_exception(e)
        if not ready:
            return
        requests = [r for _, reqs in ready for r in reqs]
        send("generate", requests)
        try:
            results = self.engine.generate(requests, batch_size=self.batch_size)
        except Exception as e:  # noqa: BLE001
            self.failed = e
            for job, _ in ready:
                job.future.set_exception(api.APIError(500, f"generation failed: {e!r}"))
            if self.uvicorn is not None:
                self.uvicorn.should_exit = True
            return
        lo = 0
        for job, reqs in ready:
            part = results[lo : lo + len(reqs)]
            lo += len(reqs)
            try:
                job.future.set_result(job.respond(reqs, part))
            except Exception as e:  # noqa: BLE001
                job.future.set_exception(e)

    async def submit(self, job: Job):
        if self.failed is not None:
            raise api.APIError(503, "the server is stopping after a generation failure")
        self.jobs.put(job)
        return await asyncio.wrap_future(job.future)

    # ---- HTTP
    def _app(self) -> FastAPI:
        app = FastAPI(title="mtnlg", docs_url=None, redoc_url=None, openapi_url=None)
        tok = self.engine.tokenizer

        @app.exception_handler(api.APIError)
        async def _api_error(_: Request, e: api.APIError):
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            return JSONResponse(api.error_body(e.message, e.param, kind), status_code=e.status)

        @app.exception_handler(RequestValidationError)
        async def _invalid(_: Request, e: RequestValidationError):
            msgs = []
            for err in e.errors():
                if err.get("type") == "json_invalid":
                    msgs.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error')})")
                    continue
                loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
                msgs.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
            return JSONResponse(api.error_body("; ".join(msgs)), status_code=400)

        @app.get("/health")
        async def health():
            if self.failed is not None:
                raise api.APIError(503, "generation failed; the server is stopping")
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models():
            card = {"id": self.name, "object": "model", "created": int(time.time())}
            card.update(owned_by="mtnlg", max_model_len=self.engine.cfg.max_position_embeddings)
            return {"object": "list", "data": [card]}

        @app.post("/v1/completions")
        async def completions(body: api.CompletionRequest):
            if body.model is not None and body.model != self.name:
                raise api.APIError(404, f"model {body.model!r} is not served here ({self.name!r})")
            job = Job(
                lambda _tok: api.completion_requests(body, tok.tokenize)[1],
                lambda reqs, res: api.completion_response(self.name, reqs, res),
                per_prompt=body.n,
            )
            return await self.submit(job)

        @app.put("/api")
        async def megatron(body: api.MegatronRequest):
            job = Job(
                lambda _tok: api.megatron_requests(body, tok.tokenize),
                lambda _reqs, res: api.megatron_response(body.prompts, res, tok.detokenize),
            )
            return await self.submit(job)

        return app

    def serve(self, host: str, port: int, log_level: str = "info") -> bool:
        """Serve until SIGINT/SIGTERM (or a generation failure: returns False)."""
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
            if self.failed is None:
                self.jobs.put(None)
                worker.join()
            for s, handler in old.items():
                signal.signal(s, handler)
        return self.failed is None
