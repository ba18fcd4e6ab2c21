"""Errors the API layer raises; the HTTP layer turns each into a JSON body and a 4xx status."""

from __future__ import annotations

from typing import Optional

from pydantic import ValidationError

from server.schemas.common import ErrorDetail, ErrorResponse


class APIError(Exception):
    """A request the server refuses, with the status, the offending field and the reason."""

    status: int = 400
    error_type: str = "invalid_request_error"

    def __init__(self, message: str, param: Optional[str] = None, status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:
            self.status = status

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorDetail(message=self.message, type=self.error_type, param=self.param,
                              code=str(self.status))
        )


class ModelNotFoundError(APIError):
    status = 404
    error_type = "not_found_error"


class UnsupportedContentError(APIError):
    """Content the model cannot read, such as an image sent to a text-only model."""


class ServerBusyError(APIError):
    status = 503
    error_type = "server_busy_error"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, param=None)
        self.retry_after_s = retry_after_s


def _location(loc: tuple) -> str:
    """Render a pydantic error location as a dotted path, with list indices in brackets.

    Union branches appear in the location as type names (e.g. `str`, `list[...]`); they say
    nothing to a client, so they are dropped."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif any(ch in item for ch in "[]()'\"") or item in {"str", "int", "float", "bool"}:
            continue
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "body"


def validation_error(exc: ValidationError) -> APIError:
    """Name the first failing field and why; a union reports one error per branch, so the
    most specific error (the one with the deepest location) is the useful one."""
    errors = exc.errors(include_url=False)
    first = max(errors, key=lambda err: len(err["loc"]))
    field = _location(first["loc"])
    reason = first["msg"]
    if first["type"] == "extra_forbidden":
        reason = "unknown field"
    elif first["type"] == "missing":
        reason = "field required"
    return APIError(f"{field}: {reason}", param=field)
