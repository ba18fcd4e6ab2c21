"""Request and response models of the OpenAI-compatible routes (/v1/...)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field
from typing_extensions import Annotated

from server.schemas.common import StrictModel

MAX_CHOICES = 16  # n above this multiplies the load of one request beyond what a CPU host serves
MAX_STOP_SEQUENCES = 4  # the OpenAI API's own limit
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token in practice, +100 forces it

StopSequences = Union[str, Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)], None]


class StreamOptions(StrictModel):
    include_usage: bool = False


class JsonSchemaFormat(StrictModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(
        default=None, alias="schema",
        description="The JSON schema the output follows; absent: any JSON object.")
    strict: Optional[bool] = Field(
        default=None, description="Accepted; the schema is always enforced during decoding.")


class TextResponseFormat(StrictModel):
    type: Literal["text"]


class JsonObjectResponseFormat(StrictModel):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(StrictModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    Union[TextResponseFormat, JsonObjectResponseFormat, JsonSchemaResponseFormat],
    Field(discriminator="type")]
LogitBias = dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]]


class _SamplingOptions(StrictModel):
    model: str = Field(min_length=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: StopSequences = None
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    seed: Optional[int] = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # vLLM's extras beyond OpenAI's fields
    top_k: Optional[int] = Field(default=None, ge=-1, description="-1 or 0: no limit (vLLM)")
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    logit_bias: Optional[LogitBias] = Field(
        default=None, description="Token id (as a string) -> bias added to its logit.")
    response_format: Optional[ResponseFormat] = None


# ---- messages ---------------------------------------------------------------------------


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ImageURL(StrictModel):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None


class ImagePart(StrictModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]
MessageContent = Union[str, list[ContentPart]]


class FunctionCall(StrictModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON object encoded in a string.")


class OpenAIToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(StrictModel):
    role: Literal["system", "developer"]
    content: MessageContent
    name: Optional[str] = None


class UserMessage(StrictModel):
    role: Literal["user"]
    content: MessageContent
    name: Optional[str] = None


class AssistantMessage(StrictModel):
    role: Literal["assistant"]
    content: Optional[MessageContent] = None
    tool_calls: Optional[list[OpenAIToolCall]] = None
    name: Optional[str] = None
    refusal: Optional[str] = None


class ToolMessage(StrictModel):
    role: Literal["tool"]
    content: MessageContent
    tool_call_id: str


ChatMessage = Annotated[
    Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")
]


# ---- tools ------------------------------------------------------------------------------


class FunctionDefinition(StrictModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


# ---- requests ---------------------------------------------------------------------------


class OpenAIChatCompletionRequest(_SamplingOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = None


PromptInput = Union[str, list[str], list[int], list[list[int]]]


class OpenAICompletionRequest(_SamplingOptions):
    prompt: PromptInput
    max_tokens: Optional[int] = Field(default=16, ge=0)
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False


# ---- responses --------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    tool_calls: Optional[list[OpenAIToolCall]] = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[FinishReason] = None


class OpenAIChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(BaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[FinishReason] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class OpenAICompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llama-engine"
    aliases: list[str] = Field(default_factory=list)
    max_model_len: int
    root: Optional[str] = Field(default=None, description="A LoRA adapter's path.")
    parent: Optional[str] = Field(default=None, description="A LoRA adapter's base model id.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- LoRA adapters at run time (vLLM's routes and shapes) -----------------------------------

class LoadLoRAAdapterRequest(StrictModel):
    lora_name: str = Field(min_length=1, description="The name requests give as `model`.")
    lora_path: str = Field(min_length=1, description="A PEFT adapter folder or a llama.cpp "
                                                     "GGUF adapter file, on the server.")


class UnloadLoRAAdapterRequest(StrictModel):
    lora_name: str = Field(min_length=1)


class LoRAAdapterResponse(BaseModel):
    object: Literal["lora_adapter"] = "lora_adapter"
    id: str
    parent: str = Field(description="The base model the adapter runs on.")
    status: Literal["loaded", "unloaded"]
