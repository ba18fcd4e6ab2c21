"""Server-sent events: one JSON object per `data:` line."""

from __future__ import annotations

import logging
from typing import AsyncIterator, Optional

from aiohttp import web
from pydantic import BaseModel

from server.api.errors import APIError, InternalServerError

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
OPENAI_DONE = b"data: [DONE]\n\n"
ERROR_LOG = logging.getLogger("server.error")


def sse_event(payload: BaseModel) -> bytes:
    return b"data: " + payload.model_dump_json().encode("utf-8") + b"\n\n"


async def send_event_stream(request: web.Request, events: AsyncIterator[BaseModel],
                            done_marker: Optional[bytes] = None) -> web.StreamResponse:
    """Stream `events` as SSE. The first event is awaited before the headers go out, so a
    request refused up front (bad field, busy server) still gets a plain 4xx JSON error. A
    client that disconnects cancels this handler; closing `events` then aborts the request."""
    iterator = events.__aiter__()
    try:
        try:
            first: Optional[BaseModel] = await iterator.__anext__()
        except StopAsyncIteration:
            first = None
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            if first is not None:
                await response.write(sse_event(first))
            async for event in iterator:
                await response.write(sse_event(event))
        except APIError as exc:  # headers are gone: report the failure in-band
            await response.write(sse_event(exc.to_response()))
        except ConnectionError:  # the client went away: nobody to tell
            raise
        except Exception:  # an engine failure mid-stream: log it, tell the client in-band
            ERROR_LOG.exception("stream failed on %s %s", request.method, request.path)
            await response.write(sse_event(InternalServerError().to_response()))
        if done_marker is not None:
            await response.write(done_marker)
        await response.write_eof()
        return response
    finally:
        await iterator.aclose()  # type: ignore[attr-defined]
