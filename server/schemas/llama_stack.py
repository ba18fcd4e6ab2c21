"""Request and response models of the spec's Inference API (llama_stack_draft_spec.py)."""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal, Optional, Union

from pydantic import Field, Strict, StringConstraints
from typing_extensions import Annotated

from server.schemas.common import StrictModel

# The spec's URL type: only web, file and inline data references are allowed.
URL = Annotated[str, StringConstraints(pattern=r"^(https?://|file://|data:)")]

MODEL_NAME_DESCRIPTION = (
    "A loaded model id or an alias the operator mapped to it (for example llama3_8b_chat); "
    "GET /v1/models lists them."
)


class Attachment(StrictModel):
    """A reference to an external resource such as an image, a video or a document."""

    url: URL
    mime_type: str


ContentItem = Union[str, Attachment]
Content = Union[str, Attachment, list[ContentItem]]


class StopReason(str, Enum):
    not_stopped = "not_stopped"
    finished_ok = "finished_ok"
    max_tokens = "max_tokens"


class BuiltinTool(str, Enum):
    web_search = "web_search"
    math = "math"
    image_gen = "image_gen"
    code_interpreter = "code_interpreter"


class SamplingStrategy(str, Enum):
    greedy = "greedy"
    top_p = "top_p"
    top_k = "top_k"


class SamplingParams(StrictModel):
    strategy: SamplingStrategy = Field(default=SamplingStrategy.greedy, strict=False)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)


class ToolCall(StrictModel):
    """A request, produced by the model, to run a tool."""

    tool_name: str = Field(min_length=1)
    arguments: dict[str, Any]


class ToolResponse(StrictModel):
    tool_name: str = Field(min_length=1)
    content: Content


class Message(StrictModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: Content
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_responses: list[ToolResponse] = Field(default_factory=list)


class Dialog(StrictModel):
    message: Message
    message_history: list[Message] = Field(default_factory=list)


class ShieldConfig(StrictModel):
    shield_type: Literal["llama_guard", "prompt_guard", "code_guard"]
    params: dict[str, Any] = Field(default_factory=dict)


class ToolDefinition(StrictModel):
    """A built-in tool, or a custom one whose `parameters` is a JSON schema (or a map of
    parameter name to {param_type, description, required})."""

    # A built-in's name is that tool, whatever else a custom tool could be called.
    tool_name: Union[Annotated[BuiltinTool, Strict(False)],
                     Annotated[str, StringConstraints(min_length=1)]] = Field(
        union_mode="left_to_right")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    input_shields: list[ShieldConfig] = Field(default_factory=list)
    output_shields: list[ShieldConfig] = Field(default_factory=list)


class JsonSchemaResponseFormat(StrictModel):
    """Output constrained to JSON valid under `json_schema` (later Llama Stack releases'
    response_format; not in the draft spec)."""

    type: Literal["json_schema"]
    json_schema: dict[str, Any]


TOOL_CHOICE_DESCRIPTION = (
    "auto (the model decides), required (it must call one of available_tools), none (tools "
    "are not offered), or the name of the one tool it must call; later Llama Stack releases' "
    "tool_choice, not in the draft spec."
)


class GenerationOptions(StrictModel):
    model: str = Field(min_length=1, description=MODEL_NAME_DESCRIPTION)
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    max_tokens: int = Field(
        default=0, ge=0, description="0 generates until a stop token or the context limit."
    )
    logprobs: bool = False
    response_format: Optional[JsonSchemaResponseFormat] = None


class CompletionRequest(GenerationOptions):
    content: Content
    stream: bool = False


class CompletionResponse(StrictModel):
    content: Content
    stop_reason: Optional[StopReason] = None
    logprobs: Optional[dict[str, Any]] = None


class CompletionResponseStreamChunk(StrictModel):
    text_delta: str
    stop_reason: Optional[StopReason] = None
    logprobs: Optional[dict[str, Any]] = None


class ChatCompletionRequest(GenerationOptions):
    dialog: Dialog
    available_tools: list[ToolDefinition] = Field(default_factory=list)
    tool_choice: str = Field(default="auto", min_length=1, description=TOOL_CHOICE_DESCRIPTION)
    stream: bool = False


class ChatCompletionResponse(StrictModel):
    content: Content
    tool_calls: list[ToolCall] = Field(default_factory=list)
    stop_reason: Optional[StopReason] = None
    logprobs: Optional[dict[str, Any]] = None


class ChatCompletionResponseStreamChunk(StrictModel):
    text_delta: str
    stop_reason: Optional[StopReason] = None
    tool_call: Optional[ToolCall] = None
    logprobs: Optional[dict[str, Any]] = None


class BatchCompletionRequest(GenerationOptions):
    content_batch: list[Content] = Field(min_length=1)


class BatchChatCompletionRequest(GenerationOptions):
    batch_dialogs: list[Dialog] = Field(min_length=1)
    available_tools: list[ToolDefinition] = Field(default_factory=list)
    tool_choice: str = Field(default="auto", min_length=1, description=TOOL_CHOICE_DESCRIPTION)
