"""The spec's Inference API: completion, chat completion, and their batch forms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from server.api.errors import APIError
from server.api.generation import (ChoiceDelta, DeltaTracker, EngineRequest, GenerationRunner,
                                   engine_request, forced_call_constraint, json_constraint,
                                   make_sampling_params, run_together, token_piece)
from server.api.prompts import content_text, render_messages, spec_dialog_turns, spec_tools
from server.api.registry import ModelRegistry, Served
from server.api.tool_calls import ParsedToolCall, StreamingToolCallParser, ToolCallFormat, ToolSpec
from server.schemas import llama_stack as ls

STOP_REASONS = {"stop": ls.StopReason.finished_ok, "length": ls.StopReason.max_tokens}
# The engine's sampling fields as the spec's requests spell them.
SAMPLING_FIELDS = {name: f"sampling_params.{name}" for name in ("temperature", "top_p", "top_k")}


@dataclass
class PreparedRequest:
    """A validated request, ready for the engine."""

    model: Served
    engine_request: EngineRequest
    tool_format: Optional[ToolCallFormat] = None  # set when tools were offered
    tools: list[Any] = field(default_factory=list)


def stop_reason(finish_reason: Optional[str]) -> ls.StopReason:
    return STOP_REASONS.get(finish_reason or "", ls.StopReason.not_stopped)


def engine_sampling(options: ls.GenerationOptions, skip_special_tokens: bool = True,
                    structured_outputs: Any = None) -> Any:
    """The engine's SamplingParams; `structured_outputs` (a forced tool call) overrides the
    request's response_format."""
    if structured_outputs is None and options.response_format is not None:
        structured_outputs = json_constraint(options.response_format.json_schema,
                                             "response_format.json_schema")
    sp = options.sampling_params
    if sp.strategy == ls.SamplingStrategy.top_k and sp.top_k < 1:
        raise APIError("sampling_params.top_k: must be >= 1 when strategy is top_k",
                       param="sampling_params.top_k")
    temperature = 0.0 if sp.strategy == ls.SamplingStrategy.greedy else sp.temperature
    return make_sampling_params(
        SAMPLING_FIELDS,
        max_tokens=options.max_tokens or None,  # the spec's 0: up to a stop or the context
        temperature=temperature,
        top_p=sp.top_p if sp.strategy == ls.SamplingStrategy.top_p else 1.0,
        top_k=sp.top_k if sp.strategy == ls.SamplingStrategy.top_k else 0,
        logprobs=0 if options.logprobs else None,
        skip_special_tokens=skip_special_tokens,
        structured_outputs=structured_outputs,
    )


def logprobs_dict(model: Served, delta: ChoiceDelta) -> Optional[dict[str, Any]]:
    """The chosen tokens and their log-probabilities, in generation order."""
    if delta.logprobs is None:
        return None
    return {"tokens": [token_piece(model.tokenizer, t)[0] for t in delta.token_ids],
            "token_logprobs": [lp.get(t) for t, lp in zip(delta.token_ids, delta.logprobs)]}


def spec_tool_call(call: ParsedToolCall) -> ls.ToolCall:
    return ls.ToolCall(tool_name=call.name, arguments=call.arguments)


def chosen_tools(tools: list[ToolSpec], tool_choice: str) -> list[ToolSpec]:
    """The tools rendered into the prompt, as narrowed by tool_choice."""
    if tool_choice in ("auto", "required"):
        if tool_choice == "required" and not tools:
            raise APIError("tool_choice: 'required' needs at least one tool in available_tools",
                           param="tool_choice")
        return tools
    if tool_choice == "none":
        return []
    named = [t for t in tools if t.name == tool_choice]
    if not named:
        raise APIError(f"tool_choice: {tool_choice!r} is not auto, required, none or the name "
                       "of a tool in available_tools", param="tool_choice")
    return named


class InferenceService:
    def __init__(self, registry: ModelRegistry, runner: GenerationRunner):
        self.registry = registry
        self.runner = runner

    # ---- preparation ----------------------------------------------------------------------

    def prepare_completion(self, request: ls.GenerationOptions, content: ls.Content,
                           field_path: str) -> PreparedRequest:
        model = self.registry.resolve(request.model)
        text = content_text(content, field_path, model.model_id)
        prompt_ids = model.tokenizer.encode(text)
        return PreparedRequest(model, engine_request(model, prompt_ids, engine_sampling(request),
                                                     {**SAMPLING_FIELDS, "prompt": field_path}))

    def prepare_chat(self, request: ls.GenerationOptions, dialog: ls.Dialog,
                     tool_definitions: list[ls.ToolDefinition], field_path: str) -> PreparedRequest:
        model = self.registry.resolve(request.model)
        all_tools = spec_tools(tool_definitions)
        tools = chosen_tools(all_tools, request.tool_choice)
        tool_format = model.tool_format
        messages = render_messages(spec_dialog_turns(dialog, model.model_id), tools, tool_format)
        try:
            prompt_ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as exc:
            raise APIError(f"{field_path}: {exc}", param=field_path) from None
        forced = None
        if tools and request.tool_choice != "auto":
            names = [t.name for t in all_tools]
            forced = forced_call_constraint(
                tool_format, tools, [f"available_tools[{names.index(t.name)}].parameters"
                                     for t in tools], parallel=True)
        keep_special = bool(tools) and tool_format.needs_special_tokens
        params = engine_sampling(request, skip_special_tokens=not keep_special,
                                 structured_outputs=forced)
        return PreparedRequest(model, engine_request(model, prompt_ids, params,
                                                     {**SAMPLING_FIELDS, "prompt": field_path}),
                               tool_format if tools else None, tools)

    # ---- completion -----------------------------------------------------------------------

    async def completion(self, request: ls.CompletionRequest) -> ls.CompletionResponse:
        prepared = self.prepare_completion(request, request.content, "content")
        with prepared.model.admit(1):
            return await self._complete(prepared)

    async def _complete(self, prepared: PreparedRequest) -> ls.CompletionResponse:
        final = await self.runner.run(prepared.engine_request)
        delta = DeltaTracker().advance(final.outputs[0])
        return ls.CompletionResponse(content=delta.text, stop_reason=stop_reason(delta.finish_reason),
                                     logprobs=logprobs_dict(prepared.model, delta))

    async def completion_stream(
            self, request: ls.CompletionRequest) -> AsyncIterator[ls.CompletionResponseStreamChunk]:
        prepared = self.prepare_completion(request, request.content, "content")
        with prepared.model.admit(1):
            tracker = DeltaTracker()
            async with self.runner.open(prepared.engine_request) as outputs:
                async for output in outputs:
                    delta = tracker.advance(output.outputs[0])
                    # tokens whose text is held back (a possible stop string) still bring
                    # their logprobs
                    if delta.text or delta.token_ids or output.finished:
                        yield ls.CompletionResponseStreamChunk(
                            text_delta=delta.text,
                            stop_reason=stop_reason(delta.finish_reason) if output.finished else None,
                            logprobs=logprobs_dict(prepared.model, delta))

    async def batch_completion(self, request: ls.BatchCompletionRequest) -> list[ls.CompletionResponse]:
        batch = [self.prepare_completion(request, content, f"content_batch[{i}]")
                 for i, content in enumerate(request.content_batch)]
        with batch[0].model.admit(len(batch)):
            return await run_together([self._complete(p) for p in batch])

    # ---- chat -----------------------------------------------------------------------------

    async def chat_completion(self, request: ls.ChatCompletionRequest) -> ls.ChatCompletionResponse:
        prepared = self.prepare_chat(request, request.dialog, request.available_tools, "dialog")
        with prepared.model.admit(1):
            return await self._chat(prepared)

    async def _chat(self, prepared: PreparedRequest) -> ls.ChatCompletionResponse:
        final = await self.runner.run(prepared.engine_request)
        delta = DeltaTracker().advance(final.outputs[0])
        text, calls = delta.text, []
        if prepared.tool_format is not None:
            text, calls = prepared.tool_format.parse(delta.text)
        return ls.ChatCompletionResponse(
            content=text.strip() if calls else text, tool_calls=[spec_tool_call(c) for c in calls],
            stop_reason=stop_reason(delta.finish_reason), logprobs=logprobs_dict(prepared.model, delta))

    async def chat_completion_stream(
            self, request: ls.ChatCompletionRequest) -> AsyncIterator[ls.ChatCompletionResponseStreamChunk]:
        prepared = self.prepare_chat(request, request.dialog, request.available_tools, "dialog")
        parser = StreamingToolCallParser(prepared.tool_format) if prepared.tool_format else None
        with prepared.model.admit(1):
            tracker = DeltaTracker()
            finish_reason: Optional[str] = None
            async with self.runner.open(prepared.engine_request) as outputs:
                async for output in outputs:
                    delta = tracker.advance(output.outputs[0])
                    finish_reason = delta.finish_reason
                    text, calls = parser.feed(delta.text) if parser else (delta.text, [])
                    for chunk in self._chat_chunks(text, calls, logprobs_dict(prepared.model, delta)):
                        yield chunk
            text, calls = parser.finish() if parser else ("", [])
            for chunk in self._chat_chunks(text, calls, None):
                yield chunk
            yield ls.ChatCompletionResponseStreamChunk(text_delta="", stop_reason=stop_reason(finish_reason))

    @staticmethod
    def _chat_chunks(text: str, calls: list[ParsedToolCall],
                     logprobs: Optional[dict[str, Any]]) -> list[ls.ChatCompletionResponseStreamChunk]:
        chunks = []
        if text or logprobs:
            chunks.append(ls.ChatCompletionResponseStreamChunk(text_delta=text, logprobs=logprobs))
        chunks.extend(ls.ChatCompletionResponseStreamChunk(text_delta="", tool_call=spec_tool_call(c))
                      for c in calls)
        return chunks

    async def batch_chat_completion(
            self, request: ls.BatchChatCompletionRequest) -> list[ls.ChatCompletionResponse]:
        batch = [self.prepare_chat(request, dialog, request.available_tools, f"batch_dialogs[{i}]")
                 for i, dialog in enumerate(request.batch_dialogs)]
        with batch[0].model.admit(len(batch)):
            return await run_together([self._chat(p) for p in batch])
