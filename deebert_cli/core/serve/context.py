"""What every HTTP request of `deebert serve` goes through (Starlette middleware and exception handlers):

* its id: ``X-Request-Id`` as sent (1 to 200 visible ASCII characters; anything else is a 400), or a new
  one; echoed in the response headers, in its access-log line and in every error logged for it;
* one access-log line (logger ``deebert.serve``: ``[id] client "METHOD /path HTTP/1.1" status ms``);
* its response counted by route and status in the Prometheus metrics, whatever answered it;
* every error in TEI's JSON shape ``{"error", "error_type"}``: 404 and 405 from the router, and a bug's
  500 (logged once, with the request id and the traceback, instead of uvicorn's anonymous one).
"""
from __future__ import annotations

import contextvars
import logging
import sys
import time
import uuid

from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

LOG = logging.getLogger("deebert.serve")
REQUEST_ID: contextvars.ContextVar = contextvars.ContextVar("deebert_request_id", default="-")
MAX_ID = 200  # characters of an X-Request-Id
ERROR_TYPES = {404: "not_found", 405: "method_not_allowed"}


def error(status: int, message: str, error_type: str, retry_after: int | None = None,
          headers: dict | None = None) -> JSONResponse:
    """TEI's error answer. The message is made encodable (a lone surrogate a client sent comes back escaped)."""
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers or None)


def log_error(message: str, *args, exc_info: bool = False) -> None:
    """An error log line carrying the current request's id."""
    LOG.error("[%s] " + message, REQUEST_ID.get(), *args, exc_info=exc_info)


def setup_logging(access_log: bool) -> None:
    """Log lines of ``deebert.serve`` to stderr: errors always, one line per request with ``access_log``."""
    LOG.setLevel(logging.INFO if access_log else logging.WARNING)
    LOG.propagate = False
    if not any(getattr(h, "deebert_serve", False) for h in LOG.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.deebert_serve = True
        LOG.addHandler(handler)


def _printable(text: str, limit: int = 200) -> str:
    """A client's text fit for one log line: control and non-ASCII characters escaped, cut at ``limit``."""
    out = "".join(c if " " <= c <= "~" else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                  for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


def _request_id(scope) -> tuple:
    """-> (id, valid): the client's X-Request-Id, or a new id (valid False when the client's is unusable)."""
    sent = Headers(scope=scope).getlist("x-request-id")
    if not sent:
        return uuid.uuid4().hex, True
    rid = sent[0]
    if len(sent) == 1 and 1 <= len(rid) <= MAX_ID and all("!" <= c <= "~" for c in rid):
        return rid, True
    return uuid.uuid4().hex, False


class RequestContext:
    """The pure ASGI middleware doing the above; ``paths``: the routes' paths (others count as unmatched)."""

    def __init__(self, app, metrics, paths: frozenset):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid, valid = _request_id(scope)
        token = REQUEST_ID.set(rid)
        status = None

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", rid)
            await send(message)

        try:
            if not valid:
                answer = error(400, f"X-Request-Id must be one header of 1 to {MAX_ID} visible ASCII characters",
                               "validation")
                await answer(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:  # a bug: answered and logged here, with the request id
            log_error('unexpected error in "%s %s"', scope["method"], _printable(scope["path"]), exc_info=True)
            if status is None:
                answer = error(500, f"internal server error (request id {rid}): see the server's log", "backend")
                await answer(scope, receive, send_with_id)
        finally:
            self._done(scope, status, start)
            REQUEST_ID.reset(token)

    def _done(self, scope, status: int | None, start: float) -> None:
        status = 499 if status is None else status  # nothing was sent: the client went away first
        path = scope["path"]
        self.metrics.response(path if path in self.paths else "unmatched", status,
                              predict=path == "/predict" or (path == "/" and scope["method"] == "POST"))
        client = scope.get("client")
        LOG.info('[%s] %s "%s %s HTTP/%s" %d %.1fms', REQUEST_ID.get(), f"{client[0]}:{client[1]}" if client else "-",
                 _printable(scope["method"], 20), _printable(scope["path"]), scope.get("http_version", "1.1"),
                 status, (time.perf_counter() - start) * 1000)


async def http_error(request: HttpRequest, exc: HTTPException) -> JSONResponse:
    """The router's 404 and 405 (and any other HTTPException) as TEI's JSON error."""
    where = f"{request.method} {_printable(request.url.path)}"
    if exc.status_code == 404:
        message = f"no route for {where}: POST /predict, GET /, /health, /info, /metrics"
    elif exc.status_code == 405:
        message = f"method not allowed: {where} (allowed: {(exc.headers or {}).get('Allow', '?')})"
    else:
        message = str(exc.detail)
    return error(exc.status_code, message, ERROR_TYPES.get(exc.status_code, "validation"), headers=exc.headers)


def make_app(routes: list, metrics, lifespan=None) -> Starlette:
    """A Starlette app over ``routes`` with the request context and TEI's JSON errors."""
    paths = frozenset(r.path for r in routes)
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error},
                     middleware=[Middleware(RequestContext, metrics=metrics, paths=paths)])
