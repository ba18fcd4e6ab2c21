"""The one place the API layer calls the engine: sampling parameters and prompts that the
engine validates (its refusals become 400s naming the request's own field), request ids, abort
on early exit, timing hooks for metrics, and the per-choice increments streams send."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Optional, Protocol

from llama_engine import errors as engine_errors
from llama_engine.errors import RequestValidationError
from llama_engine.sampling_params import SamplingParams
from server.api.errors import APIError, NotFoundError
from server.api.registry import Served

# How each API names the engine's fields, where it names them differently; a prompt's field
# is given per request (its path in the body).
EngineFields = Mapping[str, str]


class GenerationListener(Protocol):
    """Told about each request's progress; the metrics layer implements it."""

    def first_token(self, model_id: str, seconds_since_start: float) -> None: ...

    def request_finished(self, model_id: str, prompt_tokens: int, generated_tokens: int,
                         seconds_after_first_token: float, cached_tokens: int) -> None: ...


def refused(exc: RequestValidationError, fields: EngineFields) -> APIError:
    """The engine's refusal as a 400 naming the field as this request spelt it."""
    field = fields.get(exc.field, exc.field)
    return APIError(f"{field}: {exc.reason}", param=field)


def make_sampling_params(fields: EngineFields, **kwargs: Any) -> SamplingParams:
    """SamplingParams, which validates and normalises every setting (the engine's one check)."""
    try:
        return SamplingParams(**kwargs)
    except RequestValidationError as exc:
        raise refused(exc, fields) from None


@dataclass
class EngineRequest:
    """A request the engine validated and has not started: what GenerationRunner runs."""

    model: Served
    request: Any  # llama_engine Request, from EngineClient.make_request

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_token_ids


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


def engine_request(model: Served, prompt_ids: list[int], params: SamplingParams,
                   fields: EngineFields) -> EngineRequest:
    """Have the engine check the prompt against the model (vocabulary, context length with
    max_tokens) before anything is sent back, so a refusal is a plain 400."""
    try:
        return EngineRequest(model, model.engine.make_request(f"req-{uuid.uuid4().hex}",
                                                              prompt_ids, params, model.lora_name))
    except RequestValidationError as exc:
        raise refused(exc, fields) from None
    except engine_errors.NotFoundError as exc:  # its adapter was unloaded since resolve()
        raise NotFoundError(str(exc), param="model") from None


# OpenAI's spelling of a token that is not whole UTF-8 on its own: "bytes:\xe3\x81"
PARTIAL_TOKEN_PREFIX = "bytes:"


def token_piece(tokenizer: Any, token_id: int) -> tuple[str, bytes]:
    """A token as the APIs report it: its text, and its own bytes (``bytes`` joined across a
    text rebuild it). A token holding part of a multi-byte character has no text of its
    own; its text then spells its bytes escaped, as OpenAI does."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return PARTIAL_TOKEN_PREFIX + "".join(f"\\x{b:02x}" for b in raw), raw


@dataclass
class GenerationRunner:
    """Runs one engine request and reports its timings."""

    listener: Optional[GenerationListener] = None

    async def stream(self, prepared: EngineRequest) -> AsyncIterator[Any]:
        """Yield the engine's cumulative RequestOutputs. Leaving early (a client that went
        away, a cancelled task) aborts the engine request so its KV blocks are freed."""
        model, request_id = prepared.model, prepared.request.request_id
        started = time.monotonic()
        first_token_at: Optional[float] = None
        last: Any = None
        outputs = model.engine.run(prepared.request)
        try:
            async for last in outputs:
                if first_token_at is None and any(o.token_ids for o in last.outputs):
                    first_token_at = time.monotonic()
                    self._first_token(model, first_token_at - started)
                yield last
        except engine_errors.NotFoundError as exc:  # its adapter was unloaded before it ran
            raise NotFoundError(str(exc), param="model") from None
        finally:
            await outputs.aclose()
            if last is None or not last.finished:
                await model.engine.abort(request_id)
            self._finished(model, last, first_token_at)

    def _first_token(self, model: Served, seconds: float) -> None:
        if self.listener is not None:
            self.listener.first_token(model.model_id, seconds)

    def _finished(self, model: Served, last: Any, first_token_at: Optional[float]) -> None:
        if self.listener is None or last is None:
            return
        generated = sum(len(o.token_ids) for o in last.outputs)
        decode_s = time.monotonic() - first_token_at if first_token_at is not None else 0.0
        self.listener.request_finished(model.model_id, len(last.prompt_token_ids), generated,
                                       decode_s, last.num_cached_tokens)

    def open(self, prepared: EngineRequest) -> Any:
        """`async with runner.open(...) as outputs`: the stream, closed (and so aborted if
        unfinished) when the block exits, however it exits."""
        return contextlib.aclosing(self.stream(prepared))

    async def run(self, prepared: EngineRequest) -> Any:
        """The finished RequestOutput."""
        last = None
        async with self.open(prepared) as outputs:
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
        self._finished: set[int] = set()  # choices whose finish_reason was already reported

    def advance(self, output: Any) -> ChoiceDelta:
        text_start = self._text_len.get(output.index, 0)
        token_start = self._token_count.get(output.index, 0)
        self._text_len[output.index] = len(output.text)
        self._token_count[output.index] = len(output.token_ids)
        logprobs = output.logprobs[token_start:] if output.logprobs is not None else None
        # A choice that finished keeps its finish_reason in every later output of the
        # request (its siblings still run): report it once.
        finish_reason = None if output.index in self._finished else output.finish_reason
        if output.finish_reason is not None:
            self._finished.add(output.index)
        return ChoiceDelta(index=output.index, text=output.text[text_start:],
                           token_ids=list(output.token_ids[token_start:]), logprobs=logprobs,
                           finish_reason=finish_reason)


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
