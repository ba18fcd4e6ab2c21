"""Errors the API layer raises; the HTTP layer turns each into a JSON body and a 4xx status."""

from __future__ import annotations

from typing import Any, Optional

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


class NotFoundError(APIError):
    status = 404
    error_type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    pass


class ConflictError(APIError):
    """The request names something that already exists (a dataset or job uuid)."""

    status = 409
    error_type = "conflict_error"


class UnsupportedContentError(APIError):
    """Content the model cannot read, such as an image sent to a text-only model."""


class InternalServerError(APIError):
    """A bug on the server's side (logged with its traceback), never the request's fault."""

    status = 500
    error_type = "server_error"  # OpenAI's type for its 500s

    def __init__(self) -> None:
        super().__init__("internal server error")


class ServerBusyError(APIError):
    status = 503
    error_type = "server_busy_error"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, param=None)
        self.retry_after_s = retry_after_s


def _location(loc: tuple, data: Any, names_missing_field: bool) -> str:
    """Render a pydantic error location as a dotted path with list indices in brackets.

    Union branches appear in locations as tags (a type or model name, a discriminator value)
    that say nothing to a client; they are the items with no counterpart in the request
    body, so the path follows the body and skips them, except a missing field's name."""
    parts: list[str] = []
    current = data
    for position, item in enumerate(loc):
        is_last = position == len(loc) - 1
        if isinstance(item, int) and isinstance(current, list) and 0 <= item < len(current):
            parts.append(f"[{item}]")
            current = current[item]
        elif isinstance(item, str) and isinstance(current, dict) and item in current:
            parts.append(("." if parts else "") + item)
            current = current[item]
        elif is_last and names_missing_field and isinstance(item, str):
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "body"


def _specificity(error: Any, data: Any) -> tuple[int, int]:
    """Rank a union's per-branch errors: the one that got deepest into the body, and a
    broken constraint before a mere type mismatch (the branch the client meant)."""
    path = _location(error["loc"], data, error["type"] == "missing")
    return path.count(".") + path.count("["), 0 if error["type"].endswith(("_type", "_parsing")) else 1


def validation_error(exc: ValidationError, data: Any, root: str = "") -> APIError:
    """Name the failing field and why; ``root`` names a body that is not an object."""
    best = max(exc.errors(include_url=False), key=lambda err: _specificity(err, data))
    field = _location(best["loc"], data, best["type"] == "missing")
    if root:
        field = root if field == "body" else root + field
    reason = {"extra_forbidden": "unknown field", "missing": "field required"}.get(best["type"], best["msg"])
    return APIError(f"{field}: {reason}", param=field)
