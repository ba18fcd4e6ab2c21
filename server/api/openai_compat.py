"""The OpenAI-compatible API: /v1/models, /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import codecs
import contextlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

from server.api.errors import APIError, UnsupportedContentError
from server.api.generation import (ChoiceDelta, DeltaTracker, EngineFields, EngineRequest,
                                   GenerationRunner, engine_request, forced_call_constraint,
                                   json_constraint, make_sampling_params, merge_streams,
                                   run_together, token_piece)
from server.api.prompts import ChatTurn, render_messages
from server.api.registry import ModelRegistry, Served
from server.api.tool_calls import ParsedToolCall, StreamingToolCallParser, ToolCallFormat, ToolSpec
from server.schemas import openai as oa

DEFAULT_TEMPERATURE = 1.0  # OpenAI's defaults when the client leaves these out
DEFAULT_TOP_P = 1.0
VLLM_EXTRAS = ("top_k", "min_p", "repetition_penalty")  # left out: the engine's defaults


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


def check_field_dependencies(request: Union[oa.OpenAIChatCompletionRequest,
                                            oa.OpenAICompletionRequest]) -> None:
    """Fields that mean something only beside another one are refused without it (as vLLM
    and OpenAI refuse them) rather than silently ignored."""
    if request.stream_options is not None and not request.stream:
        raise APIError("stream_options: only allowed when stream is true", param="stream_options")
    if (isinstance(request, oa.OpenAIChatCompletionRequest) and request.top_logprobs is not None
            and not request.logprobs):
        raise APIError("top_logprobs: only allowed when logprobs is true", param="top_logprobs")


TOKEN_ID = re.compile(r"[0-9]+")


def token_bias(request: Any) -> Optional[dict[int, float]]:
    """`logit_bias` with its keys (token ids written as strings) read; the engine checks
    them against the vocabulary."""
    if not request.logit_bias:
        return None
    bias = {}
    for key, value in request.logit_bias.items():
        if not TOKEN_ID.fullmatch(key):
            raise APIError(f"logit_bias: key {key!r} is not a token id", param="logit_bias")
        bias[int(key)] = value
    return bias


def response_constraint(response_format: Optional[Any]) -> Any:
    """The engine constraint for `response_format` (None for text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_constraint(None, "response_format")
    return json_constraint(response_format.json_schema.schema_, "response_format.json_schema.schema")


def _sampling(request: Any, max_tokens: Optional[int], logprobs: Optional[int],
              fields: EngineFields, skip_special_tokens: bool = True,
              prompt_logprobs: Optional[int] = None, structured_outputs: Any = None) -> Any:
    extras = {name: getattr(request, name) for name in VLLM_EXTRAS
              if getattr(request, name) is not None}
    return make_sampling_params(
        fields, n=request.n, max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
        seed=request.seed, stop=request.stop,
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        skip_special_tokens=skip_special_tokens, logit_bias=token_bias(request),
        structured_outputs=structured_outputs, **extras)


def _usage(prompt_tokens: int, completion_tokens: int) -> oa.Usage:
    return oa.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens)


def _top_entries(tokenizer: Any, logprobs: dict[int, float], count: int) -> list[oa.TopLogprob]:
    best = sorted(logprobs.items(), key=lambda item: item[1], reverse=True)[:count]
    return [_top_logprob(tokenizer, token_id, value) for token_id, value in best]


def _top_logprob(tokenizer: Any, token_id: int, value: float) -> oa.TopLogprob:
    text, raw = token_piece(tokenizer, token_id)
    return oa.TopLogprob(token=text, logprob=value, bytes=list(raw))


def chat_logprobs(model: Served, delta: ChoiceDelta, top: int) -> Optional[oa.ChoiceLogprobs]:
    if delta.logprobs is None:
        return None
    content = []
    for token_id, logprobs in zip(delta.token_ids, delta.logprobs):
        chosen = _top_logprob(model.tokenizer, token_id, logprobs.get(token_id, float("-inf")))
        content.append(oa.TokenLogprob(**chosen.model_dump(),
                                       top_logprobs=_top_entries(model.tokenizer, logprobs, top)))
    return oa.ChoiceLogprobs(content=content)


def openai_tool_calls(calls: list[ParsedToolCall]) -> list[oa.OpenAIToolCall]:
    return [oa.OpenAIToolCall(id=_tool_call_id(), function=oa.FunctionCall(
        name=c.name, arguments=json.dumps(c.arguments))) for c in calls]


@dataclass
class PreparedChat:
    model: Served
    engine_request: EngineRequest
    tool_format: Optional[ToolCallFormat]
    top_logprobs: int


def forces_tool_call(request: oa.OpenAIChatCompletionRequest) -> bool:
    return request.tool_choice == "required" or isinstance(request.tool_choice, oa.NamedToolChoice)


@dataclass
class PreparedCompletion:
    model: Served
    engine_requests: list[EngineRequest]  # one per prompt
    echo_texts: list[Optional[str]]  # each prompt as sent, when echo asks for it
    logprobs: Optional[int]


class CompletionChoiceStream:
    """One choice of a completion, streamed or not (a whole response is one step): the
    echoed prompt once, with its tokens' logprobs, then text increments with theirs, and
    the finish reason once. ``text_offset`` counts characters of the token bytes so far, so
    a stream's offsets are the whole response's."""

    def __init__(self, index: int, model: Served, echo_text: Optional[str],
                 logprobs: Optional[int]):
        self.index = index
        self.model = model
        self.echo_text = echo_text  # None once sent, or without echo
        self.logprobs = logprobs
        self.characters = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, final: Any, delta: ChoiceDelta) -> Optional[oa.CompletionChoice]:
        text, token_ids, logprobs = delta.text, delta.token_ids, delta.logprobs
        if self.echo_text is not None:
            if not (token_ids or delta.finish_reason):
                return None  # the prefill (and the prompt's logprobs) is not done yet
            text = self.echo_text + text
            if self.logprobs is not None:
                token_ids = final.prompt_token_ids + token_ids
                logprobs = final.prompt_logprobs + (logprobs or [])
            self.echo_text = None
        if not (text or token_ids or delta.finish_reason):
            return None
        return oa.CompletionChoice(index=self.index, text=text,
                                   logprobs=self._logprobs(token_ids, logprobs),
                                   finish_reason=delta.finish_reason)

    def _logprobs(self, token_ids: list[int], logprobs: Optional[list[Optional[dict[int, float]]]]
                  ) -> Optional[oa.CompletionLogprobs]:
        if self.logprobs is None or logprobs is None:
            return None
        tokens, offsets = [], []
        for token_id in token_ids:
            text, raw = token_piece(self.model.tokenizer, token_id)
            tokens.append(text)
            offsets.append(self.characters)
            self.characters += len(self.decoder.decode(raw))
        return oa.CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[None if lp is None else lp.get(t) for t, lp in zip(token_ids, logprobs)],
            # OpenAI's completions list the `logprobs` most likely tokens and always the
            # chosen one (up to logprobs + 1 entries): the engine's entries are exactly that.
            top_logprobs=[None if lp is None else
                          {e.token: e.logprob for e in _top_entries(self.model.tokenizer, lp,
                                                                   len(lp))}
                          for lp in logprobs],
            text_offset=offsets)


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
        """The loaded models, then the LoRA adapters (``parent``: their base model's id)."""
        return oa.ModelList(data=[
            oa.ModelCard(id=m.model_id, created=m.created, aliases=list(m.aliases),
                         max_model_len=m.max_model_len) for m in self.registry.models()] + [
            oa.ModelCard(id=a.lora_name, created=a.created, max_model_len=a.max_model_len,
                         root=a.lora_path, parent=a.base.model_id)
            for a in self.registry.adapters()])

    # ---- chat -----------------------------------------------------------------------------

    def prepare_chat(self, request: oa.OpenAIChatCompletionRequest) -> PreparedChat:
        check_field_dependencies(request)
        model = self.registry.resolve(request.model)
        tools = offered_tools(request)
        tool_format = model.tool_format
        messages = render_messages(chat_turns(request.messages, model.model_id), tools, tool_format)
        try:
            prompt_ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as exc:
            raise APIError(f"messages: {exc}", param="messages") from None
        if tools and forces_tool_call(request):
            names = [t.function.name for t in request.tools or []]
            structured = forced_call_constraint(
                tool_format, tools, [f"tools[{names.index(t.name)}].function.parameters"
                                     for t in tools], request.parallel_tool_calls is not False)
        else:
            structured = response_constraint(request.response_format)
        top = request.top_logprobs or 0
        keep_special = bool(tools) and tool_format.needs_special_tokens
        fields = {"prompt": "messages", "logprobs": "top_logprobs",
                  "max_tokens": ("max_tokens" if request.max_completion_tokens is None
                                 else "max_completion_tokens")}
        max_tokens = (request.max_tokens if request.max_completion_tokens is None
                      else request.max_completion_tokens)
        params = _sampling(request, max_tokens, top if request.logprobs else None, fields,
                           skip_special_tokens=not keep_special, structured_outputs=structured)
        return PreparedChat(model, engine_request(model, prompt_ids, params, fields),
                            tool_format if tools else None, top)

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
            final = await self.runner.run(prepared.engine_request)
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
            async with self.runner.open(prepared.engine_request) as outputs:
                async for final in outputs:
                    for output in final.outputs:
                        for choice in streams[output.index].advance(tracker.advance(output)):
                            yield chunk([choice])
            if request.stream_options and request.stream_options.include_usage and final is not None:
                yield chunk([], _usage(len(final.prompt_token_ids),
                                       sum(len(o.token_ids) for o in final.outputs)))

    # ---- completions ----------------------------------------------------------------------

    @staticmethod
    def _prompts(prompt: oa.PromptInput) -> list[Union[str, list[int]]]:
        """Each prompt as sent: a text or a list of token ids."""
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        if not prompt:
            raise APIError("prompt: must not be an empty list", param="prompt")
        return list(prompt)  # type: ignore[arg-type]

    def prepare_completion(self, request: oa.OpenAICompletionRequest) -> PreparedCompletion:
        check_field_dependencies(request)
        model = self.registry.resolve(request.model)
        prompts = self._prompts(request.prompt)
        # The echoed prompt's tokens come with their logprobs (the first has none).
        prompt_logprobs = request.logprobs if request.echo else None
        structured = response_constraint(request.response_format)
        engine_requests = []
        for index, prompt in enumerate(prompts):
            fields = {"prompt": "prompt" if len(prompts) == 1 else f"prompt[{index}]",
                      "prompt_logprobs": "logprobs"}
            params = _sampling(request, request.max_tokens, request.logprobs, fields,
                               prompt_logprobs=prompt_logprobs, structured_outputs=structured)
            ids = model.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            engine_requests.append(engine_request(model, ids, params, fields))
        echo_texts = [None if not request.echo else prompt if isinstance(prompt, str)
                      else model.tokenizer.decode(prompt, skip_special_tokens=False)
                      for prompt in prompts]
        return PreparedCompletion(model, engine_requests, echo_texts, request.logprobs)

    def _choice_streams(self, prepared: PreparedCompletion, n: int) -> list[list[CompletionChoiceStream]]:
        """[prompt][choice]: choice j of prompt i is index i * n + j, as OpenAI numbers them."""
        return [[CompletionChoiceStream(i * n + j, prepared.model, echo, prepared.logprobs)
                 for j in range(n)] for i, echo in enumerate(prepared.echo_texts)]

    async def completion(self, request: oa.OpenAICompletionRequest) -> oa.OpenAICompletionResponse:
        prepared = self.prepare_completion(request)
        with prepared.model.admit(len(prepared.engine_requests) * request.n):
            finals = await run_together([self.runner.run(r) for r in prepared.engine_requests])
        choices = [streams[o.index].advance(final, DeltaTracker().advance(o))
                   for streams, final in zip(self._choice_streams(prepared, request.n), finals)
                   for o in final.outputs]
        return oa.OpenAICompletionResponse(
            id=_new_id("cmpl"), created=int(time.time()), model=request.model, choices=choices,
            usage=_usage(sum(len(f.prompt_token_ids) for f in finals),
                         sum(len(o.token_ids) for f in finals for o in f.outputs)))

    async def completion_stream(self, request: oa.OpenAICompletionRequest) -> AsyncIterator[oa.OpenAICompletionResponse]:
        prepared = self.prepare_completion(request)
        with prepared.model.admit(len(prepared.engine_requests) * request.n):
            chunk_id, created = _new_id("cmpl"), int(time.time())
            choice_streams = self._choice_streams(prepared, request.n)
            trackers = [DeltaTracker() for _ in prepared.engine_requests]
            finals: dict[int, Any] = {}
            streams = [self.runner.stream(r) for r in prepared.engine_requests]
            async with contextlib.aclosing(merge_streams(streams)) as outputs:
                async for prompt_index, final in outputs:
                    finals[prompt_index] = final
                    for output in final.outputs:
                        choice = choice_streams[prompt_index][output.index].advance(
                            final, trackers[prompt_index].advance(output))
                        if choice is not None:
                            yield oa.OpenAICompletionResponse(id=chunk_id, created=created,
                                                              model=request.model, choices=[choice])
            if request.stream_options and request.stream_options.include_usage:
                yield oa.OpenAICompletionResponse(
                    id=chunk_id, created=created, model=request.model, choices=[],
                    usage=_usage(sum(len(f.prompt_token_ids) for f in finals.values()),
                                 sum(len(o.token_ids) for f in finals.values() for o in f.outputs)))
