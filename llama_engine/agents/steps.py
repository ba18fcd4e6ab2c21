"""A turn's steps as streamed chunks (the spec's AgenticSystemExecuteResponseStreamChunk) and
the turn they assemble into (AgenticSystemTurn). The non-streaming answer is built by
assembling the same chunks, so it always equals what a streaming client assembles.

How chunks assemble, per step (``step_uuid``):
- ``step_start`` opens the step;
- ``step_progress`` adds to it: ``response_text_delta`` to a model_inference step's text,
  ``tool_call`` / ``tool_response_delta`` to a tool_execution step's calls and responses,
  ``retrieved_document`` (with its ``score``, an addition to the spec) to a memory_retrieval
  step's documents and scores;
- ``step_end`` closes it; a safety_filtering step's ``violation`` (or null) comes here, a
  model_inference step's ``stop_reason`` too.
The turn's last chunk also carries ``response_message`` (an addition to the spec: the
spec's chunk has no field for it)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from typing import Any, Optional

MODEL_INFERENCE = "model_inference"
TOOL_EXECUTION = "tool_execution"
SAFETY_FILTERING = "safety_filtering"
MEMORY_RETRIEVAL = "memory_retrieval"
STEP_START, STEP_PROGRESS, STEP_END = "step_start", "step_progress", "step_end"

# What each step type holds before any progress
EMPTY_STEP: dict[str, dict[str, Any]] = {
    MODEL_INFERENCE: {"text": ""},
    TOOL_EXECUTION: {"tool_calls": [], "tool_responses": []},
    SAFETY_FILTERING: {"violation": None},
    MEMORY_RETRIEVAL: {"documents": [], "scores": []},
}


@dataclass
class StepChunk:
    """One streamed event of a turn; the payload fields are spec JSON objects."""

    event_type: str
    step_uuid: str
    step_type: str
    violation: Optional[dict[str, Any]] = None
    tool_call: Optional[dict[str, Any]] = None
    tool_response_delta: Optional[dict[str, Any]] = None
    response_text_delta: Optional[str] = None
    retrieved_document: Optional[dict[str, Any]] = None
    score: Optional[float] = None
    stop_reason: Optional[str] = None
    response_message: Optional[dict[str, Any]] = None

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def new_step_uuid() -> str:
    return str(uuid.uuid4())


def assemble_turn(user_messages: list[dict[str, Any]], chunks: list[StepChunk]) -> dict[str, Any]:
    """The AgenticSystemTurn that ``chunks`` describe (rules in the module docstring)."""
    steps: dict[str, dict[str, Any]] = {}
    response_message: Optional[dict[str, Any]] = None
    for chunk in chunks:
        step = steps.get(chunk.step_uuid)
        if step is None:
            step = steps[chunk.step_uuid] = {"step_type": chunk.step_type, "uuid": chunk.step_uuid,
                                             **_fresh(EMPTY_STEP[chunk.step_type])}
        if chunk.response_text_delta is not None:
            step["text"] += chunk.response_text_delta
        if chunk.tool_call is not None:
            step["tool_calls"].append(chunk.tool_call)
        if chunk.tool_response_delta is not None:
            step["tool_responses"].append(chunk.tool_response_delta)
        if chunk.retrieved_document is not None:
            step["documents"].append(chunk.retrieved_document)
            step["scores"].append(chunk.score)
        if chunk.event_type == STEP_END and chunk.step_type == SAFETY_FILTERING:
            step["violation"] = chunk.violation
        if chunk.response_message is not None:
            response_message = chunk.response_message
    return {"user_messages": user_messages, "steps": list(steps.values()),
            "response_message": response_message}


def _fresh(template: dict[str, Any]) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, list) else value for key, value in template.items()}
