"""What a route is: the table in app.py is read by both the handlers and the OpenAPI builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from pydantic import BaseModel

JSON_CONTENT_TYPE = "application/json"
JSONL_CONTENT_TYPE = "application/jsonl"


@dataclass(frozen=True)
class Route:
    """One route: what it reads, how it answers, and the service call behind it.

    ``call`` gets the parsed query (when ``query_model`` is set) and then the parsed body
    (when ``request_model`` is set); a RootModel body may be a JSON array."""

    path: str
    summary: str
    tag: str
    request_model: Optional[type[BaseModel]]  # the JSON body; None: the route reads none
    response_model: Optional[type[BaseModel]]  # None: the call returns nothing (JSON null)
    call: Callable[[Any], Awaitable[Any]]
    stream_call: Optional[Callable[[Any], Any]] = None  # for requests with stream=true
    stream_model: Optional[type[BaseModel]] = None
    jsonl: bool = False  # answers one response per line
    done_marker: Optional[bytes] = None  # what ends the event stream, if anything
    method: str = "POST"
    query_model: Optional[type[BaseModel]] = None  # fields read from the query string
    errors: tuple[int, ...] = ()  # statuses beyond the common ones (409, 415...)
    event_stream: bool = False  # call always answers with an event stream of stream_model
    empty_body: bool = False  # answers 200 with no body, not JSON null (the call returns nothing)
