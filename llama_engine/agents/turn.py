"""The turn loop (issue 14 §2): input shields -> memory retrieval -> inference -> tool calls
(built-in ones run here, each between its own shields; a call to a tool the agent lacks gets
a tool response saying so) -> inference again, at most ``max_infer_iters`` times -> output
shields on the final answer, before any of it is streamed -> the turn.

Calls to tools the client runs (offered, not executable) end the turn with them in
``response_message.tool_calls``; the client sends the ToolResponse in its next execute.
``tool_choice: required`` forces a call on the turn's first inference after user text only:
once tool results are in, the model may answer (forcing again would loop forever)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Optional, Protocol

from llama_engine.agents.config import AgentConfig
from llama_engine.agents.inference import ChatInference, InferenceRequest
from llama_engine.agents.retrieval import Retrieval, retrieve
from llama_engine.agents.steps import (MEMORY_RETRIEVAL, MODEL_INFERENCE, SAFETY_FILTERING, STEP_END,
                                       STEP_PROGRESS, STEP_START, TOOL_EXECUTION, StepChunk,
                                       new_step_uuid)
from llama_engine.agents.tools import BuiltinTools

DEFAULT_REFUSAL = "I can't help with that."
FLUSH = None  # yielded by _steps before silent work: send the step_end it holds now
BLOCKING_VIOLATION = "error"  # a "warn" violation is recorded and the turn goes on


class MessageShield(Protocol):
    """A safety check over spec messages (agents.shields.Shield): None when they pass, else
    a violation with violation_type, details, suggested_user_response."""

    def run(self, messages: list[dict[str, Any]]) -> Any: ...


class StepListener(Protocol):
    """Told how long each step took (the server's metrics)."""

    def step_finished(self, step_type: str, seconds: float) -> None: ...


@dataclass
class AgentShields:
    """An agent's shields, built once: its own, and each tool's by tool name."""

    input: list[MessageShield] = field(default_factory=list)
    output: list[MessageShield] = field(default_factory=list)
    tool_input: dict[str, list[MessageShield]] = field(default_factory=dict)
    tool_output: dict[str, list[MessageShield]] = field(default_factory=dict)


@dataclass
class AgentRuntime:
    """What turns run on: the model, the built-in tools, the memory banks, the metrics."""

    inference: ChatInference
    tools: BuiltinTools
    memory: Any = None  # llama_engine.memory.MemoryStore; None: agents cannot use banks
    listener: Optional[StepListener] = None


def message(role: str, content: Any, tool_calls: Optional[list] = None,
            tool_responses: Optional[list] = None) -> dict[str, Any]:
    return {"role": role, "content": content, "tool_calls": tool_calls or [],
            "tool_responses": tool_responses or []}


def content_text(content: Any) -> str:
    """The text parts of spec Content (attachments are left out)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(item for item in content if isinstance(item, str))
    return ""


def model_visible(content: Any) -> Any:
    """Tool output as a text model reads it: attachments that are not inline text become a
    note naming their type (the image itself stays in the turn for the client)."""
    items = content if isinstance(content, list) else [content]
    parts = []
    for item in items:
        if isinstance(item, dict) and not (item.get("mime_type", "").startswith("text/")
                                           and item.get("url", "").startswith("data:")):
            parts.append(f"[{item.get('mime_type', 'file')} attachment]")
        else:
            parts.append(item)
    return parts if isinstance(content, list) else parts[0]


def replay(turn_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier turns as messages, in order: each turn's user messages, the tool calls made
    inside it with their results, and its response."""
    messages: list[dict[str, Any]] = []
    for turn in turn_history:
        messages.extend(turn["user_messages"])
        text = ""
        for step in turn["steps"]:
            if step["step_type"] == MODEL_INFERENCE:
                text = step["text"]
            elif step["step_type"] == TOOL_EXECUTION and step["tool_calls"]:
                messages.append(message("assistant", text, step["tool_calls"]))
                messages.append(message("tool", "", tool_responses=step["tool_responses"]))
                text = ""
        if turn.get("response_message"):
            messages.append(turn["response_message"])
    return messages


def for_model(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**m, "tool_responses": [{**r, "content": model_visible(r["content"])}
                                     for r in m.get("tool_responses", [])]} for m in messages]


def violation_json(violation: Any) -> dict[str, Any]:
    return {"violation_type": str(violation.violation_type), "details": violation.details,
            "suggested_user_response": violation.suggested_user_response or DEFAULT_REFUSAL}


class Turn:
    """One execute: ``run()`` yields the turn's chunks; the last carries response_message."""

    def __init__(self, agent: AgentConfig, shields: AgentShields, runtime: AgentRuntime,
                 messages: list[dict[str, Any]], turn_history: list[dict[str, Any]]):
        self.agent, self.shields, self.runtime = agent, shields, runtime
        self.new_messages = messages
        self.history = replay(turn_history)
        self.conversation: list[dict[str, Any]] = []
        self.refusal: Optional[dict[str, Any]] = None  # set by a blocking shield
        self.response: Optional[dict[str, Any]] = None  # the model's last message, once known

    # ---- steps ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _timed(self, step_type: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.runtime.listener is not None:
                self.runtime.listener.step_finished(step_type, time.perf_counter() - started)

    async def _shield_step(self, shields: list[MessageShield],
                           messages: list[dict[str, Any]]) -> AsyncIterator[StepChunk]:
        """A safety_filtering step; a blocking violation sets ``self.refusal``."""
        step = new_step_uuid()
        yield StepChunk(STEP_START, step, SAFETY_FILTERING)
        found = None
        with self._timed(SAFETY_FILTERING):
            for shield in shields:
                violation = await asyncio.to_thread(shield.run, messages)
                if violation is not None:
                    found = found if found is not None and found.violation_type == BLOCKING_VIOLATION else violation
                    if violation.violation_type == BLOCKING_VIOLATION:
                        break
        payload = violation_json(found) if found is not None else None
        if found is not None and found.violation_type == BLOCKING_VIOLATION:
            self.refusal = message("assistant", payload["suggested_user_response"])
        yield StepChunk(STEP_END, step, SAFETY_FILTERING, violation=payload)

    async def _memory_step(self) -> AsyncIterator[StepChunk]:
        step = new_step_uuid()
        yield StepChunk(STEP_START, step, MEMORY_RETRIEVAL)
        with self._timed(MEMORY_RETRIEVAL):
            retrieval = await asyncio.to_thread(retrieve, self.runtime.memory, self.agent.memory_bank_uuids,
                                                self._query(), self.agent.memory_token_budget)
        for document, score in zip(retrieval.documents, retrieval.scores):
            yield StepChunk(STEP_PROGRESS, step, MEMORY_RETRIEVAL, retrieved_document=document, score=score)
        yield StepChunk(STEP_END, step, MEMORY_RETRIEVAL)
        self._inject(retrieval)

    def _query(self) -> str:
        """The conversation's recent user text: this execute's user messages, else the last
        user message of the history (a turn that only brings tool responses)."""
        new = "\n".join(content_text(m["content"]) for m in self.new_messages if m["role"] == "user")
        if new.strip():
            return new
        earlier = [m for m in self.history if m["role"] == "user"]
        return content_text(earlier[-1]["content"]) if earlier else ""

    def _inject(self, retrieval: Retrieval) -> None:
        """Write the passages into the newest user message of the conversation."""
        for index in range(len(self.conversation) - 1, -1, -1):
            current = self.conversation[index]
            if current["role"] == "user":
                if isinstance(current["content"], str):
                    content: Any = retrieval.context(current["content"])
                else:  # attachments stay, after the passages
                    items = current["content"] if isinstance(current["content"], list) else [current["content"]]
                    content = [retrieval.context(""), *items]
                self.conversation[index] = {**current, "content": content}
                return

    async def _inference_step(self, tool_choice: str, stream_text: bool,
                              result: dict[str, Any]) -> AsyncIterator[Optional[StepChunk]]:
        """A model_inference step. With ``stream_text`` off (output shields set) nothing is
        sent while the model runs: the step is sent once the caller has checked it
        (``_held_inference_chunks``). ``result`` gets text, tool_calls and stop_reason."""
        agent = self.agent
        request = InferenceRequest(model=agent.model, messages=for_model(self.conversation),
                                   tools=agent.available_tools, tool_choice=tool_choice,
                                   sampling_params=agent.sampling_params, max_tokens=agent.max_tokens)
        step = result["step"] = new_step_uuid()
        text, calls, stop_reason = [], [], None
        yield StepChunk(STEP_START, step, MODEL_INFERENCE) if stream_text else FLUSH
        with self._timed(MODEL_INFERENCE):
            async for delta in self.runtime.inference.chat(request):
                calls.extend(delta.tool_calls)
                stop_reason = delta.stop_reason or stop_reason
                if delta.text:
                    text.append(delta.text)
                    if stream_text:
                        yield StepChunk(STEP_PROGRESS, step, MODEL_INFERENCE, response_text_delta=delta.text)
        result.update(text="".join(text), tool_calls=calls, stop_reason=stop_reason)
        if stream_text:
            yield StepChunk(STEP_END, step, MODEL_INFERENCE, stop_reason=stop_reason)

    @staticmethod
    def _held_inference_chunks(result: dict[str, Any]) -> list[StepChunk]:
        step = result["step"]
        chunks = [StepChunk(STEP_START, step, MODEL_INFERENCE)]
        if result["text"]:
            chunks.append(StepChunk(STEP_PROGRESS, step, MODEL_INFERENCE, response_text_delta=result["text"]))
        chunks.append(StepChunk(STEP_END, step, MODEL_INFERENCE, stop_reason=result["stop_reason"]))
        return chunks

    async def _tool_step(self, call: dict[str, Any], responses: list[dict[str, Any]]) -> AsyncIterator[StepChunk]:
        """Run one call between the tool's shields, as a tool_execution step; its response
        is appended to ``responses`` (not when a shield blocked it)."""
        name = call["tool_name"]
        call_message = message("assistant", call["arguments"].get("code") or json.dumps(call["arguments"]),
                               [call])
        if self.shields.tool_input.get(name):
            async for chunk in self._shield_step(self.shields.tool_input[name], [call_message]):
                yield chunk
            if self.refusal is not None:
                return
        step = new_step_uuid()
        yield StepChunk(STEP_START, step, TOOL_EXECUTION)
        yield StepChunk(STEP_PROGRESS, step, TOOL_EXECUTION, tool_call=call)
        with self._timed(TOOL_EXECUTION):
            if self.agent.tool(name) is None:
                offered = ", ".join(self.agent.tool_names) or "none"
                content: Any = (f"Unknown tool {name!r}: this agent has no such tool (its tools: "
                                f"{offered}). Answer without it.")
            else:
                content = await self.runtime.tools.run(name, call["arguments"], self.agent.uuid)
        response = {"tool_name": name, "content": content}
        if self.shields.tool_output.get(name):
            output_message = message("tool", content_text(content), tool_responses=[response])
            async for chunk in self._shield_step(self.shields.tool_output[name], [call_message, output_message]):
                yield chunk
            if self.refusal is not None:
                yield StepChunk(STEP_END, step, TOOL_EXECUTION)
                return
        yield StepChunk(STEP_PROGRESS, step, TOOL_EXECUTION, tool_response_delta=response)
        yield StepChunk(STEP_END, step, TOOL_EXECUTION)
        responses.append(response)

    # ---- the loop -------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[StepChunk]:
        """The turn's chunks, each sent as soon as it is made, except that a step_end waits
        for the next chunk: the turn's last chunk (always a step_end) carries the response."""
        held: Optional[StepChunk] = None
        async for chunk in self._steps():
            if held is not None:
                yield held
                held = None
            if chunk is FLUSH:
                continue
            if chunk.event_type == STEP_END:
                held = chunk
            else:
                yield chunk
        if held is None:  # unreachable: every path through _steps ends with a step_end
            raise RuntimeError("a turn ended without a step_end")
        held.response_message = self.refusal or self.response
        yield held

    async def _steps(self) -> AsyncIterator[Optional[StepChunk]]:
        agent = self.agent
        if self.shields.input:
            async for chunk in self._shield_step(self.shields.input, self.new_messages):
                yield chunk
            if self.refusal is not None:
                return
        system = [message("system", agent.instructions)] if agent.instructions else []
        self.conversation = [*system, *self.history, *self.new_messages]
        if agent.memory_bank_uuids and self.runtime.memory is not None:
            async for chunk in self._memory_step():
                yield chunk
        after_tools = bool(self.new_messages) and self.new_messages[-1]["role"] == "tool"
        stream_text = not self.shields.output
        for iteration in range(agent.max_infer_iters):
            tool_choice = "auto" if after_tools and agent.tool_choice == "required" else agent.tool_choice
            result: dict[str, Any] = {}
            async for chunk in self._inference_step(tool_choice, stream_text, result):
                yield chunk
            calls = result["tool_calls"]
            run_here = [c for c in calls if c["tool_name"] in agent.executable_tools
                        or agent.tool(c["tool_name"]) is None]
            client_calls = [c for c in calls if c not in run_here]
            if not run_here or (iteration == agent.max_infer_iters - 1 and not client_calls):
                async for chunk in self._final(result, client_calls):
                    yield chunk
                return
            if not stream_text:
                for chunk in self._held_inference_chunks(result):
                    yield chunk
            responses: list[dict[str, Any]] = []
            for call in run_here:
                async for chunk in self._tool_step(call, responses):
                    yield chunk
                if self.refusal is not None:
                    return
            self.conversation += [message("assistant", result["text"], run_here),
                                  message("tool", "", tool_responses=responses)]
            if client_calls:
                self.response = message("assistant", "", client_calls)
                return
            after_tools = True

    async def _final(self, result: dict[str, Any], client_calls: list[dict[str, Any]]) -> AsyncIterator[StepChunk]:
        """The answer: checked by the output shields before any of it is sent."""
        self.response = message("assistant", result["text"], client_calls)
        if self.shields.output:
            async for chunk in self._shield_step(self.shields.output, [*self.new_messages, self.response]):
                yield chunk
            if self.refusal is not None:
                return
            for chunk in self._held_inference_chunks(result):
                yield chunk
