"""What the turn loop needs of a model: a chat completion over spec messages and tool
definitions, streamed, with tool calls parsed in the model family's format. The server
implements it over its Inference API (prompt rendering, tool-call parsing and forced calls
live there); tests implement it with scripted outputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Protocol


@dataclass
class InferenceRequest:
    """One chat completion. ``messages`` are spec Message objects, system first;
    ``tools`` ToolDefinition objects; ``tool_choice`` auto / required / none."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    tool_choice: str
    sampling_params: dict[str, Any]
    max_tokens: int


@dataclass
class InferenceDelta:
    """What the model produced since the last delta: plain text (tool-call markup removed),
    calls that are complete ({tool_name, arguments}), and, on the last delta, why it stopped
    (finished_ok / max_tokens / not_stopped)."""

    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: Optional[str] = None


class ChatInference(Protocol):
    def chat(self, request: InferenceRequest) -> AsyncIterator[InferenceDelta]:
        """Stream the completion; raises RequestValidationError (or the implementation's
        own refusal) before the first delta for a request it will not run."""
