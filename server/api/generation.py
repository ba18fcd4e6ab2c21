"""The one place the API layer calls the engine: prompt checks, sampling parameters, request
ids, abort on early exit, and timing hooks for metrics."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Protocol

from server.api.errors import APIError
from server.api.registry import ServedModel

_FIELD_PREFIX = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.\[\]]*)")


class GenerationListener(Protocol):
    """Told about each request's progress; the metrics layer implements it."""

    def first_token(self, model_id: str, seconds_since_start: float) -> None: ...

    def request_finished(self, model_id: str, prompt_tokens: int, generated_tokens: int,
                         seconds_after_first_token: float, cached_tokens: int) -> None: ...


def engine_error(exc: ValueError) -> APIError:
    """The engine's ValueError messages start with the field name: pass both on."""
    message = str(exc)
    match = _FIELD_PREFIX.match(message)
    return APIError(message, param=match.group(1) if match else None)


# Below these, sampling kernels working in float32 see zero (a top_p of 1e-100 becomes 0 and
# is refused mid-batch); both limits mean "only the most likely token", i.e. greedy.
MIN_TOP_P = 1e-6
MIN_TEMPERATURE = 1e-5
# A top_k beyond any vocabulary keeps every token, which is top_k off; kernels hold it in int32.
MAX_MEANINGFUL_TOP_K = 1 << 24


def make_sampling_params(**kwargs: Any) -> Any:
    from llama_engine.sampling_params import SamplingParams

    if 0 < kwargs.get("top_p", 1.0) < MIN_TOP_P:
        kwargs["top_p"] = MIN_TOP_P
    if 0 < kwargs.get("temperature", 1.0) < MIN_TEMPERATURE:
        kwargs["temperature"] = 0.0
    if kwargs.get("top_k", 0) > MAX_MEANINGFUL_TOP_K:
        kwargs["top_k"] = 0
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise engine_error(exc) from None


def constraint(field: str, **spec: Any) -> Any:
    """The engine's StructuredOutputsParams(**spec) (json=, json_object=, grammar=...),
    checked now so that a bad schema or grammar is a 400 naming `field` before anything is
    queued or streamed."""
    from llama_engine.engine.structured_output import grammar_error
    from llama_engine.sampling_params import StructuredOutputsParams

    params = StructuredOutputsParams(**spec)
    error = grammar_error(params)
    if error:
        raise APIError(f"{field}: {error}", param=field)
    return params


def json_constraint(schema: Optional[dict[str, Any]], field: str) -> Any:
    """Output must be JSON valid under `schema` (None: any JSON object)."""
    return constraint(field, json=schema) if schema is not None else constraint(
        field, json_object=True)


def forced_call_constraint(tool_format: Any, tools: list[Any], parameter_fields: list[str],
                           parallel: bool) -> Any:
    """Output must call one of `tools` (ToolSpecs) in the family's format, with arguments
    valid under the tool's schema; `parameter_fields` name each tool's schema for errors."""
    for tool, field in zip(tools, parameter_fields):
        json_constraint(tool.parameters, field)
    return constraint("tools", grammar=tool_format.forced_call_grammar(tools, parallel))


def check_prompt(model: ServedModel, prompt_ids: list[int], field: str) -> None:
    if not prompt_ids:
        raise APIError(f"{field}: the prompt is empty", param=field)
    if len(prompt_ids) >= model.max_model_len:
        raise APIError(
            f"{field}: the prompt is {len(prompt_ids)} tokens, but model {model.model_id!r} "
            f"has a context of {model.max_model_len} tokens, leaving no room to generate",
            param=field)
    vocab_size = getattr(model.tokenizer, "vocab_size", None)
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in prompt_ids):
        raise APIError(f"{field}: token ids must be in [0, {vocab_size})", param=field)


def generation_budget(model: ServedModel, prompt_tokens: int, requested: Optional[int]) -> int:
    """Tokens to generate: the request's limit, or (None/0) what the context has left; a
    request for more than the context has left is cut to what is left."""
    room = model.max_model_len - prompt_tokens
    return room if not requested else min(requested, room)


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


@dataclass
class GenerationRunner:
    """Runs one engine request and reports its timings."""

    listener: Optional[GenerationListener] = None

    async def stream(self, model: ServedModel, prompt_ids: list[int],
                     params: Any) -> AsyncIterator[Any]:
        """Yield the engine's cumulative RequestOutputs. Leaving early (a client that went
        away, a cancelled task) aborts the engine request so its KV blocks are freed."""
        request_id = f"req-{uuid.uuid4().hex}"
        started = time.monotonic()
        first_token_at: Optional[float] = None
        last: Any = None
        outputs = model.engine.generate(prompt_ids, params, request_id)
        try:
            while True:
                try:
                    last = await outputs.__anext__()
                except StopAsyncIteration:
                    break
                except ValueError as exc:  # the engine refused the request before starting it
                    raise engine_error(exc) from None
                if first_token_at is None and any(o.token_ids for o in last.outputs):
                    first_token_at = time.monotonic()
                    self._first_token(model, first_token_at - started)
                yield last
        finally:
            await outputs.aclose()
            if last is None or not last.finished:
                await model.engine.abort(request_id)
            self._finished(model, last, first_token_at)

    def _first_token(self, model: ServedModel, seconds: float) -> None:
        if self.listener is not None:
            self.listener.first_token(model.model_id, seconds)

    def _finished(self, model: ServedModel, last: Any, first_token_at: Optional[float]) -> None:
        if self.listener is None or last is None:
            return
        generated = sum(len(o.token_ids) for o in last.outputs)
        decode_s = time.monotonic() - first_token_at if first_token_at is not None else 0.0
        self.listener.request_finished(model.model_id, len(last.prompt_token_ids), generated,
                                       decode_s, last.num_cached_tokens)

    def open(self, model: ServedModel, prompt_ids: list[int], params: Any) -> Any:
        """`async with runner.open(...) as outputs`: the stream, closed (and so aborted if
        unfinished) when the block exits, however it exits."""
        return contextlib.aclosing(self.stream(model, prompt_ids, params))

    async def run(self, model: ServedModel, prompt_ids: list[int], params: Any) -> Any:
        """The finished RequestOutput."""
        last = None
        async with self.open(model, prompt_ids, params) as outputs:
            async for last in outputs:
                pass
        return last


@dataclass
class ChoiceDelta:
    """What one choice gained since the previous engine output."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[list[dict[int, float]]]
    finish_reason: Optional[str]


class DeltaTracker:
    """Turns the engine's cumulative outputs into per-choice increments."""

    def __init__(self) -> None:
        self._text_len: dict[int, int] = {}
        self._token_count: dict[int, int] = {}

    def text_length(self, index: int) -> int:
        return self._text_len.get(index, 0)

    def advance(self, output: Any) -> ChoiceDelta:
        text_start = self._text_len.get(output.index, 0)
        token_start = self._token_count.get(output.index, 0)
        self._text_len[output.index] = len(output.text)
        self._token_count[output.index] = len(output.token_ids)
        logprobs = output.logprobs[token_start:] if output.logprobs is not None else None
        return ChoiceDelta(index=output.index, text=output.text[text_start:],
                           token_ids=list(output.token_ids[token_start:]), logprobs=logprobs,
                           finish_reason=output.finish_reason)


async def run_together(coroutines: list[Any]) -> list[Any]:
    """Run requests concurrently (so the engine batches them); if one fails, the others are
    cancelled (which aborts them in the engine) and the failure is raised as is."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return [task.result() for task in tasks]


_STREAM_DONE = object()


async def merge_streams(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as their items arrive, tagged with their position.
    Leaving early, or a failure in one, cancels the rest (aborting their engine requests)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(position: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((position, item))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((position, exc))
        finally:
            await queue.put((position, _STREAM_DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            position, item = await queue.get()
            if item is _STREAM_DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
