"""What a route is: the table in app.py is read by both the handlers and the OpenAPI builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from pydantic import BaseModel

JSON_CONTENT_TYPE = "application/json"
JSONL_CONTENT_TYPE = "application/jsonl"


@dataclass(frozen=True)
class Route:
    """One route: its request model (the JSON body of a POST, the query of a GET or DELETE),
    how it answers, and the service call behind it."""

    path: str
    summary: str
    tag: str
    request_model: type[BaseModel]
    response_model: Optional[type[BaseModel]]  # None: the call returns nothing (JSON null)
    call: Callable[[Any], Awaitable[Any]]
    stream_call: Optional[Callable[[Any], Any]] = None  # for requests with stream=true
    stream_model: Optional[type[BaseModel]] = None
    jsonl: bool = False  # answers one response per line
    done_marker: Optional[bytes] = None  # what ends the event stream, if anything
    method: str = "POST"
    event_stream: bool = False  # call always answers with an event stream of stream_model
    query_in_post: bool = False  # a POST whose request model is read from the query string

    @property
    def takes_query(self) -> bool:
        return self.method != "POST" or self.query_in_post
