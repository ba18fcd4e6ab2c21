"""Request and response models of the spec's AgenticSystem API, with the options later Llama
Stack releases added to agents (sampling_params, tool_choice, max_infer_iters)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field
from typing_extensions import Annotated

from llama_engine.agents.config import (DEFAULT_MAX_INFER_ITERS, DEFAULT_MEMORY_TOKEN_BUDGET,
                                        MAX_MAX_INFER_ITERS)
from server.schemas.common import StrictModel
from server.schemas.llama_stack import (MODEL_NAME_DESCRIPTION, Message, SamplingParams, ShieldConfig,
                                        StopReason, ToolCall, ToolDefinition, ToolResponse)
from server.schemas.memory_banks import MemoryBankDocument

StepType = Literal["model_inference", "tool_execution", "safety_filtering", "memory_retrieval"]


class AgenticSystemCreateRequest(StrictModel):
    uuid: str = Field(min_length=1, description="The agent's id: execute and delete name it.")
    instructions: str = Field(description="The system prompt, first in every turn's prompt.")
    model: str = Field(min_length=1, description=MODEL_NAME_DESCRIPTION)
    available_tools: list[ToolDefinition] = Field(default_factory=list)
    executable_tools: list[str] = Field(
        default_factory=list, description="Built-in tools the server runs; calls to the other "
        "available tools end the turn, for the client to run.")
    memory_bank_uuids: list[str] = Field(default_factory=list)
    input_shields: list[ShieldConfig] = Field(default_factory=list)
    output_shields: list[ShieldConfig] = Field(default_factory=list)
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    tool_choice: Literal["auto", "required", "none"] = Field(
        default="auto", description="required forces a tool call on a turn's first inference "
        "after user text; none offers no tools.")
    max_infer_iters: int = Field(default=DEFAULT_MAX_INFER_ITERS, ge=1, le=MAX_MAX_INFER_ITERS,
                                 description="Inferences per turn, at most.")
    max_tokens: int = Field(default=0, ge=0, description="Per inference; 0 generates until a stop "
                            "token or the context limit.")
    memory_token_budget: int = Field(
        default=DEFAULT_MEMORY_TOKEN_BUDGET, ge=1,
        description="Retrieved passages injected per turn, in the embedding model's word pieces.")


class AgenticSystemCreateResponse(StrictModel):
    agent_uuid: str


class SafetyViolation(StrictModel):
    violation_type: str
    details: str
    suggested_user_response: Optional[str] = None


class ModelInferenceStep(StrictModel):
    step_type: Literal["model_inference"] = "model_inference"
    uuid: str
    text: str
    logprobs: Optional[dict[str, Any]] = None


class ToolExecutionStep(StrictModel):
    step_type: Literal["tool_execution"] = "tool_execution"
    uuid: str
    tool_calls: list[ToolCall]
    tool_responses: list[ToolResponse]


class SafetyFilteringStep(StrictModel):
    step_type: Literal["safety_filtering"] = "safety_filtering"
    uuid: str
    violation: Optional[SafetyViolation] = None


class MemoryRetrievalStep(StrictModel):
    step_type: Literal["memory_retrieval"] = "memory_retrieval"
    uuid: str
    documents: list[MemoryBankDocument]
    scores: list[float]


Step = Annotated[Union[ModelInferenceStep, ToolExecutionStep, SafetyFilteringStep, MemoryRetrievalStep],
                 Field(discriminator="step_type")]


class AgenticSystemTurn(StrictModel):
    """A single turn in an interaction with an Agentic System."""

    user_messages: list[Message]
    steps: list[Step]
    response_message: Message


class AgenticSystemExecuteRequest(StrictModel):
    agent_uuid: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1, description="User messages, or tool messages "
                                    "carrying the responses to the last turn's tool calls.")
    turn_history: list[AgenticSystemTurn] = Field(
        default_factory=list, description="Earlier turns, replayed in order after the instructions.")
    stream: bool = False


class AgenticSystemExecuteResponse(StrictModel):
    """Non-stream response from the agentic system: what the stream assembles into."""

    turn: AgenticSystemTurn


class AgenticSystemExecuteResponseStreamChunk(StrictModel):
    """Streamed agent execution response. ``score`` (beside retrieved_document) and
    ``response_message`` (on the turn's last chunk) are additions to the spec, so that the
    chunks assemble into exactly the non-streaming turn."""

    event_type: Literal["step_start", "step_end", "step_progress"]
    step_uuid: str
    step_type: StepType
    violation: Optional[SafetyViolation] = None
    tool_call: Optional[ToolCall] = None
    tool_response_delta: Optional[ToolResponse] = None
    response_text_delta: Optional[str] = None
    retrieved_document: Optional[MemoryBankDocument] = None
    score: Optional[float] = None
    stop_reason: Optional[StopReason] = Field(default=None, strict=False)
    response_message: Optional[Message] = None


class AgentQuery(StrictModel):
    agent_id: str = Field(min_length=1)
