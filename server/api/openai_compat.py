"""The OpenAI-compatible API: /v1/models, /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import json
import re
import time
import uuid
import contextlib
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from server.api.errors import APIError, UnsupportedContentError
from server.api.generation import (ChoiceDelta, DeltaTracker, GenerationRunner, check_prompt,
                                   forced_call_constraint, generation_budget, json_constraint,
                                   make_sampling_params, merge_streams, run_together,
                                   token_text)
from server.api.prompts import ChatTurn, render_messages
from server.api.registry import ModelRegistry, ServedModel
from server.api.tool_calls import ParsedToolCall, StreamingToolCallParser, ToolCallFormat, ToolSpec
from server.schemas import openai as oa

DEFAULT_TEMPERATURE = 1.0  # OpenAI's defaults when the client leaves these out
DEFAULT_TOP_P = 1.0


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _message_text(content: Optional[oa.MessageContent], path: str, model_id: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for index, part in enumerate(content):
        if isinstance(part, oa.ImagePart):
            raise UnsupportedContentError(
                f"{path}[{index}]: unsupported content: model {model_id!r} reads text only and "
                "cannot read image_url parts", f"{path}[{index}]")
        texts.append(part.text)
    return "".join(texts)


def _call_arguments(call: oa.OpenAIToolCall, path: str) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise APIError(f"{path}.function.arguments: must be a JSON object encoded as a string",
                       param=f"{path}.function.arguments")
    return arguments


def chat_turns(messages: list[Any], model_id: str) -> list[ChatTurn]:
    turns: list[ChatTurn] = []
    tool_names_by_id: dict[str, str] = {}
    for index, message in enumerate(messages):
        path = f"messages[{index}]"
        text = _message_text(message.content, f"{path}.content", model_id)
        if isinstance(message, oa.ToolMessage):
            if message.tool_call_id not in tool_names_by_id:
                raise APIError(f"{path}.tool_call_id: no earlier assistant tool call has id "
                               f"{message.tool_call_id!r}", param=f"{path}.tool_call_id")
            turns.append(ChatTurn("tool", text, tool_name=tool_names_by_id[message.tool_call_id]))
            continue
        calls = []
        for call_index, call in enumerate(getattr(message, "tool_calls", None) or []):
            arguments = _call_arguments(call, f"{path}.tool_calls[{call_index}]")
            tool_names_by_id[call.id] = call.function.name
            calls.append(ParsedToolCall(call.function.name, arguments))
        role = "system" if message.role in ("system", "developer") else message.role
        turns.append(ChatTurn(role, text, tool_calls=calls))
    return turns


def offered_tools(request: oa.OpenAIChatCompletionRequest) -> list[ToolSpec]:
    """The tools rendered into the prompt, as narrowed by tool_choice."""
    tools = [ToolSpec(name=t.function.name, description=t.function.description or "",
                      parameters=t.function.parameters or {"type": "object", "properties": {}})
             for t in request.tools or []]
    choice = request.tool_choice
    if choice == "none":
        return []
    if isinstance(choice, oa.NamedToolChoice):
        named = [t for t in tools if t.name == choice.function.name]
        if not named:
            raise APIError(f"tool_choice.function.name: {choice.function.name!r} is not in tools",
                           param="tool_choice.function.name")
        return named
    if choice == "required" and not tools:
        raise APIError("tool_choice: 'required' needs at least one tool in tools", param="tool_choice")
    return tools


TOKEN_ID = re.compile(r"[0-9]+")


def token_bias(model: ServedModel, request: Any) -> Optional[dict[int, float]]:
    """`logit_bias` with its keys (token ids written as strings) checked and read."""
    if not request.logit_bias:
        return None
    vocab_size = model.tokenizer.vocab_size
    bias = {}
    for key, value in request.logit_bias.items():
        if not TOKEN_ID.fullmatch(key) or int(key) >= vocab_size:
            raise APIError(f"logit_bias: key {key!r} is not a token id in [0, {vocab_size})",
                           param="logit_bias")
        bias[int(key)] = value
    return bias


def response_constraint(response_format: Optional[Any]) -> Any:
    """The engine constraint for `response_format` (None for text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_constraint(None, "response_format")
    return json_constraint(response_format.json_schema.schema_, "response_format.json_schema.schema")


def _sampling(model: ServedModel, request: Any, prompt_tokens: int, max_tokens: Optional[int],
              logprobs: Optional[int], skip_special_tokens: bool = True,
              structured_outputs: Any = None) -> Any:
    return make_sampling_params(
        n=request.n,
        max_tokens=generation_budget(model, prompt_tokens, max_tokens),
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
        seed=request.seed, stop=request.stop,
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        logprobs=logprobs, skip_special_tokens=skip_special_tokens,
        logit_bias=token_bias(model, request), structured_outputs=structured_outputs)


def _usage(prompt_tokens: int, completion_tokens: int) -> oa.Usage:
    return oa.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens)


def _top_entries(tokenizer: Any, logprobs: dict[int, float], count: int) -> list[oa.TopLogprob]:
    best = sorted(logprobs.items(), key=lambda item: item[1], reverse=True)[:count]
    return [_top_logprob(tokenizer, token_id, value) for token_id, value in best]


def _top_logprob(tokenizer: Any, token_id: int, value: float) -> oa.TopLogprob:
    text = token_text(tokenizer, token_id)
    return oa.TopLogprob(token=text, logprob=value, bytes=list(text.encode("utf-8")))


def chat_logprobs(model: ServedModel, delta: ChoiceDelta, top: int) -> Optional[oa.ChoiceLogprobs]:
    if delta.logprobs is None:
        return None
    content = []
    for token_id, logprobs in zip(delta.token_ids, delta.logprobs):
        chosen = _top_logprob(model.tokenizer, token_id, logprobs.get(token_id, float("-inf")))
        content.append(oa.TokenLogprob(**chosen.model_dump(),
                                       top_logprobs=_top_entries(model.tokenizer, logprobs, top)))
    return oa.ChoiceLogprobs(content=content)


def completion_logprobs(model: ServedModel, delta: ChoiceDelta, top: int,
                        text_offset: int) -> Optional[oa.CompletionLogprobs]:
    if delta.logprobs is None:
        return None
    tokens = [token_text(model.tokenizer, t) for t in delta.token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return oa.CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.get(t) for t, lp in zip(delta.token_ids, delta.logprobs)],
        top_logprobs=[{e.token: e.logprob for e in _top_entries(model.tokenizer, lp, top)}
                      for lp in delta.logprobs],
        text_offset=offsets)


def openai_tool_calls(calls: list[ParsedToolCall]) -> list[oa.OpenAIToolCall]:
    return [oa.OpenAIToolCall(id=_tool_call_id(), function=oa.FunctionCall(
        name=c.name, arguments=json.dumps(c.arguments))) for c in calls]


@dataclass
class PreparedChat:
    model: ServedModel
    prompt_ids: list[int]
    params: Any
    tool_format: Optional[ToolCallFormat]
    top_logprobs: int


def forces_tool_call(request: oa.OpenAIChatCompletionRequest) -> bool:
    return request.tool_choice == "required" or isinstance(request.tool_choice, oa.NamedToolChoice)


@dataclass
class PreparedCompletion:
    model: ServedModel
    prompts: list[list[int]]
    params: Any
    top_logprobs: int


class ChatChoiceStream:
    """One choice of a streamed chat completion: content deltas at once, each tool call as a
    whole once the model has finished writing it, then the finish reason."""

    def __init__(self, index: int, prepared: PreparedChat):
        self.index = index
        self.prepared = prepared
        self.parser = StreamingToolCallParser(prepared.tool_format) if prepared.tool_format else None
        self.calls_sent = 0

    def advance(self, delta: ChoiceDelta) -> list[oa.ChatChunkChoice]:
        text, calls = self.parser.feed(delta.text) if self.parser else (delta.text, [])
        if delta.finish_reason and self.parser:
            tail_text, tail_calls = self.parser.finish()
            text, calls = text + tail_text, calls + tail_calls
        logprobs = chat_logprobs(self.prepared.model, delta, self.prepared.top_logprobs)
        choices = []
        if text or logprobs:
            choices.append(oa.ChatChunkChoice(index=self.index, delta=oa.ChatDelta(content=text),
                                              logprobs=logprobs))
        if calls:
            deltas = [oa.DeltaToolCall(index=self.calls_sent + k, id=call.id, type="function",
                                       function=oa.DeltaFunctionCall(name=call.function.name,
                                                                     arguments=call.function.arguments))
                      for k, call in enumerate(openai_tool_calls(calls))]
            self.calls_sent += len(calls)
            choices.append(oa.ChatChunkChoice(index=self.index, delta=oa.ChatDelta(tool_calls=deltas)))
        if delta.finish_reason:
            reason = "tool_calls" if self.calls_sent else delta.finish_reason
            choices.append(oa.ChatChunkChoice(index=self.index, delta=oa.ChatDelta(), finish_reason=reason))
        return choices


class OpenAIService:
    def __init__(self, registry: ModelRegistry, runner: GenerationRunner):
        self.registry = registry
        self.runner = runner

    def list_models(self) -> oa.ModelList:
        return oa.ModelList(data=[
            oa.ModelCard(id=m.model_id, created=m.created, aliases=list(m.aliases),
                         max_model_len=m.max_model_len) for m in self.registry.models()])

    # ---- chat -----------------------------------------------------------------------------

    def prepare_chat(self, request: oa.OpenAIChatCompletionRequest) -> PreparedChat:
        model = self.registry.resolve(request.model)
        tools = offered_tools(request)
        tool_format = model.tool_format
        messages = render_messages(chat_turns(request.messages, model.model_id), tools, tool_format)
        try:
            prompt_ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as exc:
            raise APIError(f"messages: {exc}", param="messages") from None
        check_prompt(model, prompt_ids, "messages")
        if tools and forces_tool_call(request):
            names = [t.function.name for t in request.tools or []]
            structured = forced_call_constraint(
                tool_format, tools, [f"tools[{names.index(t.name)}].function.parameters"
                                     for t in tools], request.parallel_tool_calls is not False)
        else:
            structured = response_constraint(request.response_format)
        top = request.top_logprobs or 0
        keep_special = bool(tools) and tool_format.needs_special_tokens
        params = _sampling(model, request, len(prompt_ids),
                           request.max_completion_tokens or request.max_tokens,
                           top if request.logprobs else None, skip_special_tokens=not keep_special,
                           structured_outputs=structured)
        return PreparedChat(model, prompt_ids, params, tool_format if tools else None, top)

    def _chat_choice(self, prepared: PreparedChat, output: Any) -> oa.ChatChoice:
        delta = DeltaTracker().advance(output)
        text, calls = (prepared.tool_format.parse(delta.text)
                       if prepared.tool_format else (delta.text, []))
        message = oa.ResponseMessage(content=(text.strip() or None) if calls else text,
                                     tool_calls=openai_tool_calls(calls) or None)
        return oa.ChatChoice(index=output.index, message=message,
                             logprobs=chat_logprobs(prepared.model, delta, prepared.top_logprobs),
                             finish_reason="tool_calls" if calls else (output.finish_reason or "stop"))

    async def chat_completion(self, request: oa.OpenAIChatCompletionRequest) -> oa.OpenAIChatCompletionResponse:
        prepared = self.prepare_chat(request)
        with prepared.model.admit(request.n):
            final = await self.runner.run(prepared.model, prepared.prompt_ids, prepared.params)
        return oa.OpenAIChatCompletionResponse(
            id=_new_id("chatcmpl"), created=int(time.time()), model=request.model,
            choices=[self._chat_choice(prepared, o) for o in final.outputs],
            usage=_usage(len(final.prompt_token_ids), sum(len(o.token_ids) for o in final.outputs)))

    async def chat_completion_stream(
            self, request: oa.OpenAIChatCompletionRequest) -> AsyncIterator[oa.ChatCompletionChunk]:
        prepared = self.prepare_chat(request)
        with prepared.model.admit(request.n):
            chunk_id, created = _new_id("chatcmpl"), int(time.time())

            def chunk(choices: list[oa.ChatChunkChoice], usage: Optional[oa.Usage] = None):
                return oa.ChatCompletionChunk(id=chunk_id, created=created, model=request.model,
                                              choices=choices, usage=usage)

            for i in range(request.n):  # the role comes first, once per choice
                yield chunk([oa.ChatChunkChoice(index=i, delta=oa.ChatDelta(role="assistant", content=""))])
            streams = [ChatChoiceStream(i, prepared) for i in range(request.n)]
            tracker, final = DeltaTracker(), None
            async with self.runner.open(prepared.model, prepared.prompt_ids, prepared.params) as outputs:
                async for final in outputs:
                    for output in final.outputs:
                        for choice in streams[output.index].advance(tracker.advance(output)):
                            yield chunk([choice])
            if request.stream_options and request.stream_options.include_usage and final is not None:
                yield chunk([], _usage(len(final.prompt_token_ids),
                                       sum(len(o.token_ids) for o in final.outputs)))

    # ---- completions ----------------------------------------------------------------------

    def _prompt_ids(self, model: ServedModel, prompt: oa.PromptInput) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts:
            raise APIError("prompt: must not be an empty list", param="prompt")
        return [model.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]

    def prepare_completion(self, request: oa.OpenAICompletionRequest) -> PreparedCompletion:
        model = self.registry.resolve(request.model)
        prompts = self._prompt_ids(model, request.prompt)
        for index, prompt_ids in enumerate(prompts):
            check_prompt(model, prompt_ids, "prompt" if len(prompts) == 1 else f"prompt[{index}]")
        longest = max(len(p) for p in prompts)
        params = _sampling(model, request, longest, request.max_tokens, request.logprobs,
                           structured_outputs=response_constraint(request.response_format))
        return PreparedCompletion(model, prompts, params, request.logprobs or 0)

    def _completion_choice(self, prepared: PreparedCompletion, request: oa.OpenAICompletionRequest,
                           prompt_index: int, output: Any, delta: ChoiceDelta,
                           offset: int) -> oa.CompletionChoice:
        prefix = ""
        if request.echo and offset == 0:
            prefix = prepared.model.tokenizer.decode(prepared.prompts[prompt_index])
        return oa.CompletionChoice(
            index=prompt_index * request.n + output.index, text=prefix + delta.text,
            logprobs=completion_logprobs(prepared.model, delta, prepared.top_logprobs, offset + len(prefix)),
            finish_reason=delta.finish_reason)

    async def completion(self, request: oa.OpenAICompletionRequest) -> oa.OpenAICompletionResponse:
        prepared = self.prepare_completion(request)
        with prepared.model.admit(len(prepared.prompts) * request.n):
            finals = await run_together([self.runner.run(prepared.model, p, prepared.params)
                                         for p in prepared.prompts])
        choices = [self._completion_choice(prepared, request, i, o, DeltaTracker().advance(o), 0)
                   for i, final in enumerate(finals) for o in final.outputs]
        return oa.OpenAICompletionResponse(
            id=_new_id("cmpl"), created=int(time.time()), model=request.model, choices=choices,
            usage=_usage(sum(len(f.prompt_token_ids) for f in finals),
                         sum(len(o.token_ids) for f in finals for o in f.outputs)))

    async def completion_stream(self, request: oa.OpenAICompletionRequest) -> AsyncIterator[oa.OpenAICompletionResponse]:
        prepared = self.prepare_completion(request)
        with prepared.model.admit(len(prepared.prompts) * request.n):
            chunk_id, created = _new_id("cmpl"), int(time.time())
            trackers = [DeltaTracker() for _ in prepared.prompts]
            finals: dict[int, Any] = {}
            streams = [self.runner.stream(prepared.model, p, prepared.params) for p in prepared.prompts]
            async with contextlib.aclosing(merge_streams(streams)) as outputs:
                async for prompt_index, output in outputs:
                    finals[prompt_index] = output
                    for choice_output in output.outputs:
                        offset = trackers[prompt_index].text_length(choice_output.index)
                        delta = trackers[prompt_index].advance(choice_output)
                        if delta.text or delta.finish_reason or (request.echo and offset == 0):
                            yield oa.OpenAICompletionResponse(id=chunk_id, created=created, model=request.model, choices=[
                                self._completion_choice(prepared, request, prompt_index, choice_output, delta, offset)])
            if request.stream_options and request.stream_options.include_usage:
                yield oa.OpenAICompletionResponse(
                    id=chunk_id, created=created, model=request.model, choices=[],
                    usage=_usage(sum(len(f.prompt_token_ids) for f in finals.values()),
                                 sum(len(o.token_ids) for f in finals.values() for o in f.outputs)))
