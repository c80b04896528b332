"""Every error the server answers, in OpenAI's shape: ``{"error": {"message", "type", "param",
"code"}}``.

- :class:`APIError`: its own status (400, 404, 429, 500, 503).
- a body that fails validation, or is not JSON: 400, naming the field(s).
- Starlette's HTTP errors: their status (404 unknown path, 405 wrong method, 400 an unreadable
  body such as invalid UTF-8 or JSON nested too deeply).
- a body over the cap (:class:`BodyLimit`, before anything parses it): 413.
- anything else: 500 ``internal server error``; the traceback goes to the log, never to the
  client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("uvicorn.error")
MAX_ERRORS = 5
"""Validation errors quoted in one answer (the rest are counted)."""
MAX_MESSAGE = 2000
"""Error messages are cut to this many characters (they may quote the request)."""


class APIError(Exception):
    """A request answered with ``status`` and OpenAI's error shape (see :func:`error_body`)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers


def internal_error() -> APIError:
    """The 500 every unexpected failure gets: no exception text (that goes to the log)."""
    return APIError(500, "internal server error (details are in the server's log)")


def error_body(
    message: str, param: str | None = None, kind: str = "invalid_request_error", code=None
) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``; the message is made encodable
    (an unpaired surrogate quoted from the request is escaped) and cut to MAX_MESSAGE."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    if param is not None:
        param = param.encode("utf-8", "backslashreplace").decode("utf-8")[:200]
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def respond(e: APIError) -> JSONResponse:
    body = error_body(e.message, e.param, e.kind, e.code)
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def validation_error(e: RequestValidationError) -> APIError:
    """400 naming each refused field (``max_tokens: Input should be ...``)."""
    msgs, param = [], None
    errors = e.errors()
    for err in errors[:MAX_ERRORS]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            msgs.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error')})")
            continue
        if not loc and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            msgs.append("the body must be a JSON object (sent as content-type: application/json)")
            continue
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        param = param or (loc[0] if loc else None)
        msgs.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    if len(errors) > MAX_ERRORS:
        msgs.append(f"and {len(errors) - MAX_ERRORS} more")
    return APIError(400, "; ".join(msgs), param)


def http_error(e: HTTPException, request: Request, max_body: int) -> APIError:
    if e.status_code == 413:
        msg = f"the request body exceeds {max_body} bytes (6 x --max-prompt-bytes + 64 KiB)"
        return APIError(413, msg, code="request_too_large")
    if e.status_code == 404:
        return APIError(404, f"no such endpoint: {request.url.path}")
    if e.status_code == 405:
        return APIError(405, f"{request.method} is not allowed on {request.url.path}")
    if e.status_code == 400:  # FastAPI could not read the body (invalid UTF-8, too deep...)
        return APIError(400, "the body could not be read as JSON (not UTF-8, or too deep)")
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    return APIError(e.status_code, str(e.detail), kind=kind)


class BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413)


class BodyLimit:
    """ASGI middleware: a body declared (Content-Length) or streamed past ``limit`` bytes is
    answered 413 without being read further (FastAPI re-raises the HTTPException the wrapped
    ``receive`` raises, so the handlers below shape it)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            err = http_error(BodyTooLarge(), Request(scope), self.limit)
            return await respond(err)(scope, receive, send)
        size = 0

        async def limited():
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > self.limit:
                raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)


class StatusCounter:
    """ASGI middleware: ``count(status)`` for every answer of status >= 400 (Prometheus'
    ``mtnlg:request_errors_total``), whatever produced it (a handler, the body cap, a 404)."""

    def __init__(self, app: ASGIApp, count) -> None:
        self.app, self.count = app, count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.count(message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def install_error_handlers(app: FastAPI, max_body: int) -> None:
    """Route every error of ``app`` through OpenAI's error shape; cap bodies at ``max_body``."""
    app.add_middleware(BodyLimit, limit=max_body)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return respond(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        return respond(validation_error(e))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return respond(http_error(e, request, max_body))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return respond(internal_error())
