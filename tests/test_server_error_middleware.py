"""A bug in a handler answers a JSON 500 of OpenAI's ``server_error`` type (logged with its
traceback), never the request's ``invalid_request_error``."""
from __future__ import annotations

import asyncio
import json

from aiohttp.test_utils import make_mocked_request

from server.http.middleware import error_middleware


def test_an_unhandled_exception_is_a_server_error() -> None:
    async def broken(request):
        raise RuntimeError("a bug")

    response = asyncio.run(error_middleware(make_mocked_request("GET", "/v1/models"), broken))
    body = json.loads(response.body)
    assert response.status == 500
    assert body["error"]["type"] == "server_error" and body["error"]["code"] == "500"
    assert "a bug" not in body["error"]["message"]  # the traceback stays in the log
