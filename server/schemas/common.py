"""Types shared by both API dialects: the strict base model and the error body."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Rejects unknown fields so a misspelt option is reported instead of silently ignored."""

    model_config = ConfigDict(extra="forbid")


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
