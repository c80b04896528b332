"""Rank 0's HTTP side: the FastAPI app over the :class:`~mtnlg.inference.scheduler.Scheduler`.

Handlers validate the body (pydantic; the raw body is capped before it is parsed, the prompt
text in bytes before it is tokenized) and submit a :class:`Job`; the first message back says
whether the worker accepted it, so a bad request gets its 4xx before a stream starts. Then:

- ``stream: false``: the events are gathered into one OpenAI answer;
- ``stream: true``: Server-Sent Events, one ``data: {json}`` chunk per token and choice (the
  same ``id`` and ``created`` on every chunk), a last chunk with the usage when
  ``stream_options.include_usage``, then ``data: [DONE]``; a failure after the stream started is
  sent as ``data: {"error": {...}}`` and ends it.

A client that disconnects (or whose stream is closed) cancels its job: its sequences are
aborted and their slots freed before the next step. No answer carries an exception's text or a
traceback: those go to the log (``uvicorn.error``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from mtnlg.inference import api, stream
from mtnlg.inference.errors import (
    APIError,
    StatusCounter,
    install_error_handlers,
    internal_error,
)
from mtnlg.inference.params import Result
from mtnlg.inference.scheduler import Job, Limits, Scheduler

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DISCONNECT_POLL_S = 1.0
"""How often a waiting non-streaming handler checks that its client is still there."""
log = logging.getLogger("uvicorn.error")
NOT_FINITE = "generation failed for this request: the model's logits were not finite"


class _Choice:
    """What a job's events gave one sequence so far."""

    def __init__(self):
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.prompt_logprobs = None
        self.finish: str | None = None
        self.text: str | None = None

    def add(self, ev) -> None:
        if ev.token is not None:
            self.tokens.append(ev.token)
        if ev.logprob is not None:
            self.logprobs.append(ev.logprob)
        if ev.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = ev.prompt_logprobs
        if ev.finish is not None:
            self.finish, self.text = ev.finish, ev.text

    def result(self, want_logprobs: bool) -> Result:
        return Result(
            self.tokens,
            self.text,
            self.finish,
            logprobs=self.logprobs if want_logprobs else None,
            prompt_logprobs=self.prompt_logprobs,
        )


def _failure(finish: str) -> APIError | None:
    if finish == "error":
        log.error("a request's logits were not finite (NaN or inf): answered 500")
        return APIError(500, NOT_FINITE)
    if finish in ("failed", "abort"):
        return internal_error()
    return None


class Server:
    def __init__(
        self,
        batcher,
        model_name: str,
        limits: Limits = Limits(),
        chat_template=None,
        metrics=None,
        ping_s=30.0,
        grace_s=5.0,
    ):
        self.engine, self.name, self.limits = batcher.engine, model_name, limits
        self.grace_s = grace_s
        self.chat_template, self.metrics = chat_template, metrics
        self.scheduler = Scheduler(batcher, limits, metrics, ping_s)
        self.scheduler.on_failure = self._on_failure
        self.uvicorn = None
        self.app = self._app()

    @property
    def failed(self) -> bool:
        return self.scheduler.failed

    def _on_failure(self) -> None:
        """After a failure with several ranks: answer 503 (``/health`` included, for load
        balancers) for ``grace_s`` seconds, then stop."""

        def stop():
            if self.uvicorn is not None:
                self.uvicorn.should_exit = True

        threading.Timer(self.grace_s, stop).start()

    # ---- one job, seen from its handler
    async def _start(self, build) -> tuple[Job, list]:
        """Submit a job; its requests once the worker accepted it (else its APIError)."""
        job = Job(build, asyncio.get_running_loop())
        self.scheduler.submit(job)
        try:
            kind, value = await job.events.get()
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if kind != "accepted":
            raise value
        return job, value

    async def _next(self, job: Job, request: Request | None):
        """The job's next message; cancels the job if the client of a non-streaming request
        went away while it waited."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    job.cancelled = True
                    raise APIError(499, "client disconnected") from None

    async def _gather(self, job: Job, n: int, request: Request) -> list[_Choice]:
        """Every choice to its end (500 if one failed)."""
        choices = [_Choice() for _ in range(n)]
        try:
            while any(c.finish is None for c in choices):
                kind, *rest = await self._next(job, request)
                if kind == "failed":
                    raise rest[0]
                choice, ev = rest
                choices[choice].add(ev)
                err = _failure(ev.finish) if ev.finish else None
                if err is not None:
                    raise err
        except BaseException:
            job.cancelled = True
            raise
        return choices

    async def _events(self, job: Job, reqs: list, chunk, usage_chunk, opening=None):
        """The SSE body of a streaming job: ``opening(i)`` once per choice first (chat's role
        chunk), then ``chunk(i, text, finish, ev, first, offset)`` per event (``offset``: the
        choice's text sent before it)."""
        choices = [_Choice() for _ in reqs]
        detok = self.engine.tokenizer.detokenize
        streams = [stream.TextStream(detok, r.params.stop) for r in reqs]
        sent = [0] * len(reqs)
        try:
            if opening is not None:
                for i in range(len(reqs)):
                    yield stream.sse(opening(i))
            while any(c.finish is None for c in choices):
                kind, *rest = await self._next(job, None)
                if kind == "failed":
                    yield stream.error_event(rest[0])
                    return
                i, ev = rest
                c = choices[i]
                first = not c.tokens and c.finish is None
                c.add(ev)
                err = _failure(ev.finish) if ev.finish else None
                if err is not None:
                    yield stream.error_event(err)
                    return
                delta = streams[i].push(c.tokens, c.text if c.finish else None)
                out = chunk(i, delta, c.finish, ev, first, sent[i])
                sent[i] += len(out["choices"][0].get("text", delta))
                yield stream.sse(out)
            if usage_chunk is not None:
                results = [c.result(False) for c in choices]
                yield stream.sse(usage_chunk(reqs, results))
            yield stream.DONE
        finally:
            if any(c.finish is None for c in choices):
                job.cancelled = True  # the client left, or the stream failed: free the slots

    # ---- HTTP
    def _app(self) -> FastAPI:
        app = FastAPI(title="mtnlg", docs_url=None, redoc_url=None, openapi_url=None)
        install_error_handlers(app, self.limits.max_body_bytes)
        if self.metrics is not None:
            app.add_middleware(StatusCounter, count=self.metrics.on_error)
        tok = self.engine.tokenizer
        limit = self.scheduler.batcher.length  # a slot: --max-model-len, or the model's context
        max_bytes = self.limits.max_prompt_bytes
        sched = self.scheduler

        @app.get("/health")
        async def health():
            if self.failed:
                raise APIError(503, "generation failed; the server is stopping")
            busy = sched.busy or sched.running > 0
            return {"status": "ok", "waiting": sched.waiting, "running": sched.running,
                    "busy": busy}  # fmt: skip

        @app.get("/metrics")
        async def metrics():
            if self.metrics is None:
                raise APIError(404, "metrics are off")
            body, content_type = self.metrics.render()
            return Response(body, media_type=content_type)

        @app.get("/v1/models")
        async def models():
            card = {"id": self.name, "object": "model", "created": int(time.time())}
            card.update(owned_by="mtnlg", max_model_len=limit)
            return {"object": "list", "data": [card]}

        def check_model(model: str | None) -> None:
            if model is not None and model != self.name:
                msg = f"model {model!r} is not served here ({self.name!r})"
                raise APIError(404, msg, "model", "model_not_found")

        @app.post("/v1/completions")
        async def completions(body: api.CompletionRequest, request: Request):
            check_model(body.model)
            api.check_prompt_bytes(body.prompts, max_bytes, "prompt")
            job, reqs = await self._start(
                lambda: api.completion_requests(body, tok.tokenize, limit)
            )
            echo = [body.prompts[i // body.n] for i in range(len(reqs))] if body.echo else None
            if body.stream:
                return self._stream_completion(job, reqs, body, echo)
            choices = await self._gather(job, len(reqs), request)
            results = [c.result(body.logprobs is not None) for c in choices]
            return api.completion_response(self.name, reqs, results, body.n, echo, tok)

        @app.post("/v1/chat/completions")
        async def chat(body: api.ChatCompletionRequest, request: Request):
            check_model(body.model)
            api.check_prompt_bytes(body.texts, max_bytes, "messages")
            if self.chat_template is None:
                raise api.no_chat_template()
            job, reqs = await self._start(
                lambda: api.chat_requests(body, self.chat_template, limit)
            )
            if body.stream:
                return self._stream_chat(job, reqs, body)
            choices = await self._gather(job, len(reqs), request)
            results = [c.result(bool(body.logprobs)) for c in choices]
            return api.chat_response(self.name, reqs, results, body.n, tok)

        @app.put("/api")
        async def megatron(body: api.MegatronRequest, request: Request):
            api.check_prompt_bytes(body.prompts, max_bytes, "prompts")
            job, reqs = await self._start(lambda: api.megatron_requests(body, tok.tokenize, limit))
            choices = await self._gather(job, len(reqs), request)
            results = [c.result(False) for c in choices]
            return api.megatron_response(body.prompts, results, tok.detokenize)

        return app

    def _usage(self, body, cid: str, created: int, obj: str):
        """The builder of the last chunk (usage, no choices), or None without include_usage."""
        if not body.include_usage:
            return None

        def usage(reqs, results):
            u = api.usage(reqs, results, body.n)
            return stream.usage_chunk(cid, created, self.name, obj, u)

        return usage

    def _stream_completion(self, job, reqs, body, echo) -> StreamingResponse:
        cid, created, tok = api.new_id("cmpl"), int(time.time()), self.engine.tokenizer

        def chunk(i, text, finish, ev, first, offset):
            if first and echo is not None:
                text = echo[i] + text
            lp = None
            if body.logprobs is not None:
                prompt = reqs[i].prompt_tokens if first and echo is not None else None
                lp = api.stream_logprobs(ev, tok, prompt, offset)
            fin = api.FINISH.get(finish) if finish else None
            return stream.completion_chunk(cid, created, self.name, i, text, fin, lp)

        usage = self._usage(body, cid, created, "text_completion")
        body_iter = self._events(job, reqs, chunk, usage)
        return StreamingResponse(body_iter, media_type="text/event-stream")

    def _stream_chat(self, job, reqs, body) -> StreamingResponse:
        cid, created, tok = api.new_id("chatcmpl"), int(time.time()), self.engine.tokenizer

        def opening(i):  # OpenAI's first chunk of a choice: the role, no text yet
            return stream.chat_chunk(cid, created, self.name, i, dict(stream.ROLE_DELTA), None)

        def chunk(i, text, finish, ev, first, offset):
            delta = {"content": text} if text or not finish else {}
            lp = api.chat_stream_logprobs(ev, tok) if body.logprobs else None
            fin = api.FINISH.get(finish) if finish else None
            return stream.chat_chunk(cid, created, self.name, i, delta, fin, lp)

        usage = self._usage(body, cid, created, "chat.completion.chunk")
        body_iter = self._events(job, reqs, chunk, usage, opening)
        return StreamingResponse(body_iter, media_type="text/event-stream")

    def serve(self, host: str, port: int, log_level: str = "info") -> bool:
        """Serve until SIGINT/SIGTERM (or a generation failure with several ranks: False)."""
        import uvicorn

        worker = threading.Thread(target=self.scheduler.run, name="generate", daemon=True)
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
                self.scheduler.jobs.put(None)  # after the jobs already queued: answered first
                worker.join()
            for s, handler in old.items():
                signal.signal(s, handler)
        return not self.failed
