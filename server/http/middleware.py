"""Middlewares: access log and request metrics, API-key auth, and JSON errors for every
failure so no client ever sees an HTML error page or a bare 500."""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Awaitable, Callable, Optional

from aiohttp import web

from server.api.errors import APIError, InternalServerError, ServerBusyError
from server.http.metrics import ServerMetrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACCESS_LOG = logging.getLogger("server.access")
ERROR_LOG = logging.getLogger("server.error")
UNAUTHENTICATED_PATHS = frozenset({"/health"})
UNMATCHED_ROUTE = "<unmatched>"

# aiohttp's own refusals, reworded to name what was wrong.
HTTP_ERROR_REASONS = {
    404: ("path", "no such route"),
    405: ("method", "method not allowed on this route"),
    413: ("body", "request body is larger than the server's limit"),
}


def error_response(error: APIError, headers: Optional[dict[str, str]] = None) -> web.Response:
    headers = dict(headers or {})
    if isinstance(error, ServerBusyError):
        headers["Retry-After"] = str(error.retry_after_s)
    return web.json_response(error.to_response().model_dump(), status=error.status, headers=headers)


def route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED_ROUTE


def access_log_middleware(metrics: ServerMetrics) -> Callable:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except BaseException:
            status = 499  # the client went away (the handler was cancelled)
            raise
        finally:
            route = route_name(request)
            metrics.count_request(route, request.method, status)
            ACCESS_LOG.info(json.dumps({
                "remote": request.remote, "method": request.method, "path": request.path,
                "route": route, "status": status,
                "duration_ms": round((time.monotonic() - started) * 1000, 2),
                "request_bytes": request.content_length or 0,
                "user_agent": request.headers.get("User-Agent", "")}))
    return middleware


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as error:
        return error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        field, reason = HTTP_ERROR_REASONS.get(exc.status, ("request", exc.reason))
        kept = {name: exc.headers[name] for name in ("Allow",) if name in exc.headers}
        return error_response(APIError(f"{field}: {reason} ({request.method} {request.path})",
                                       param=field, status=exc.status), kept)
    except Exception:  # a bug: log it with its traceback, answer in JSON
        ERROR_LOG.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(InternalServerError())


def auth_middleware(api_key: Optional[str]) -> Callable:
    expected = f"Bearer {api_key}".encode() if api_key else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path not in UNAUTHENTICATED_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise APIError("Authorization: missing or wrong API key (expected 'Bearer <key>')",
                               param="Authorization", status=401)
        return await handler(request)
    return middleware
