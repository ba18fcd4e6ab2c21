"""Types shared by both API dialects: the strict base model and the error body."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Rejects unknown fields so a misspelt option is reported instead of silently ignored,
    and takes JSON's own types only (pydantic strict mode): "1" is not a number, 1 is not
    a boolean, 2.0 is not an integer, as OpenAI refuses them. An integer is a number. Enum
    fields opt out (``Field(strict=False)``): in strict mode they would want Python enum
    members, and their JSON form is a string."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    """Shaped like OpenAI's error object so the `openai` client surfaces the message."""

    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str
    models: list[str]
