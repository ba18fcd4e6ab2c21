"""The spec's AgenticSystem API over ``llama_engine.agents``: agents stored under the state
directory, turns run by ``agents.turn.Turn`` on the Inference API's chat path (prompt
rendering, tool-call parsing, forced calls), streamed as step chunks or assembled."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Optional

from llama_engine.agents.config import AgentConfig
from llama_engine.agents.inference import InferenceDelta, InferenceRequest
from llama_engine.agents.options import LLAMA_GUARD, ShieldBuilder
from llama_engine.agents.shields import guard_prompt_ids
from llama_engine.agents.steps import StepChunk, assemble_turn
from llama_engine.agents.store import AgentExistsError, AgentNotFoundError, AgentStore
from llama_engine.agents.turn import AgentRuntime, AgentShields, Turn
from llama_engine.errors import RequestValidationError
from llama_engine.memory import NotFoundError as BankNotFoundError
from server.api.errors import APIError, ConflictError, NotFoundError
from server.api.generation import engine_request, json_constraint, make_sampling_params
from server.api.inference import InferenceService, engine_sampling
from server.api.prompts import spec_tools
from server.api.registry import ServedModel
from server.schemas import agentic_system as ag
from server.schemas import llama_stack as ls

# The chat path names its errors after the Inference API's body; here they are the turn's.
CHAT_FIELD_PREFIX = "dialog"
EXECUTE_ROLES = ("user", "tool")
GUARD_MAX_TOKENS = 32  # "unsafe\nS1,S2,..." fits with room to spare


class ServerChatInference:
    """agents.inference.ChatInference over this server's Inference API."""

    def __init__(self, service: InferenceService):
        self.service = service
        self.loop: Optional[asyncio.AbstractEventLoop] = None  # the server's, for generate()

    async def chat(self, request: InferenceRequest) -> AsyncIterator[InferenceDelta]:
        spec_request = ls.ChatCompletionRequest.model_validate({
            "model": request.model, "sampling_params": request.sampling_params,
            "max_tokens": request.max_tokens, "available_tools": request.tools,
            "tool_choice": request.tool_choice, "stream": True,
            "dialog": {"message": request.messages[-1], "message_history": request.messages[:-1]}})
        try:
            async for chunk in self.service.chat_completion_stream(spec_request):
                yield InferenceDelta(
                    text=chunk.text_delta,
                    tool_calls=[chunk.tool_call.model_dump(mode="json")] if chunk.tool_call else [],
                    stop_reason=chunk.stop_reason.value if chunk.stop_reason else None)
        except APIError as exc:
            if exc.param and exc.param.startswith(CHAT_FIELD_PREFIX):
                exc.param = "messages"
                exc.message = f"messages: the agent's conversation (instructions, turn_history, " \
                              f"messages and retrieved memory) was refused: {exc.message}"
            raise

    async def _generate(self, model: ServedModel, prompt: str, max_tokens: int) -> str:
        params = make_sampling_params({}, temperature=0.0, max_tokens=max_tokens, skip_special_tokens=True)
        prepared = engine_request(model, guard_prompt_ids(model.tokenizer, prompt), params, {"prompt": "prompt"})
        with model.admit(1):
            final = await self.service.runner.run(prepared)
        return final.outputs[0].text

    def generate(self, model: ServedModel, prompt: str, max_tokens: int) -> str:
        """Run ``prompt`` greedily as the guard task on ``model`` (see shields.guard_prompt_ids).
        Blocking; called from a worker thread (a shield), runs on the server's loop."""
        assert self.loop is not None, "generate() before the server's loop was known"
        return asyncio.run_coroutine_threadsafe(self._generate(model, prompt, max_tokens), self.loop).result()


class AgenticSystemService:
    """The routes' logic. Shields are built when an agent is created (which checks them) and
    kept per agent; after a restart, on the agent's first turn. ``guard_model``: the
    llama_guard shield's model (--shield-model llama_guard=PATH); None: each agent's own."""

    def __init__(self, store: AgentStore, runtime: AgentRuntime, inference: ServerChatInference,
                 shield_builder: ShieldBuilder, guard_model: Optional[ServedModel] = None):
        self.store = store
        self.guard_model = guard_model
        self.runtime = runtime
        self.inference = inference
        self.shield_builder = shield_builder
        self._shields: dict[str, AgentShields] = {}

    # ---- shields ---------------------------------------------------------------------------

    def _guard_generate(self, shield_type: str, model_name: str) -> Callable[[str], str]:
        """The llama_guard shield's ``generate`` on the guard model (default: the agent's)."""
        model = self.guard_model or self.inference.service.registry.resolve(model_name)
        if shield_type == LLAMA_GUARD and model.tokenizer.chat_template is None:
            raise RequestValidationError("shield_type", f"llama_guard: the guard model {model.model_id!r} "
                                                        "has no chat template to put the guard task in")
        return lambda prompt: self.inference.generate(model, prompt, GUARD_MAX_TOKENS)

    def _build(self, configs: list[dict[str, Any]], field: str, model: str) -> list[Any]:
        shields = []
        for index, shield in enumerate(configs):
            try:
                generate = self._guard_generate(shield["shield_type"], model)
                shields.append(self.shield_builder(shield["shield_type"], shield["params"], generate))
            except RequestValidationError as exc:
                path = f"{field}[{index}].{exc.field}"
                raise APIError(f"{path}: {exc.reason}", param=path) from None
        return shields

    def _build_shields(self, agent: AgentConfig) -> AgentShields:
        shields = AgentShields(self._build(agent.input_shields, "input_shields", agent.model),
                               self._build(agent.output_shields, "output_shields", agent.model))
        for index, tool in enumerate(agent.available_tools):
            for kind, by_tool in (("input_shields", shields.tool_input), ("output_shields", shields.tool_output)):
                if tool[kind]:
                    by_tool[tool["tool_name"]] = self._build(tool[kind], f"available_tools[{index}].{kind}",
                                                             agent.model)
        return shields

    async def _agent_shields(self, agent: AgentConfig) -> AgentShields:
        if agent.uuid not in self._shields:
            self.inference.loop = asyncio.get_running_loop()
            self._shields[agent.uuid] = await asyncio.to_thread(self._build_shields, agent)
        return self._shields[agent.uuid]

    # ---- routes ----------------------------------------------------------------------------

    async def create(self, request: ag.AgenticSystemCreateRequest) -> ag.AgenticSystemCreateResponse:
        agent = AgentConfig.from_json(request.model_dump(mode="json"))
        try:
            agent.validate()
        except RequestValidationError as exc:
            raise APIError(str(exc), param=exc.field) from None
        model = self.inference.service.registry.resolve(agent.model)  # 404 naming `model`
        if agent.max_tokens >= model.max_model_len:
            raise APIError(f"max_tokens: {agent.max_tokens} leaves no room for a prompt in "
                           f"{agent.model!r}'s context of {model.max_model_len} tokens",
                           param="max_tokens")
        self._check_generation(request)
        await self._check_banks(agent)
        self.inference.loop = asyncio.get_running_loop()
        shields = await asyncio.to_thread(self._build_shields, agent)
        try:
            await asyncio.to_thread(self.store.create, agent)
        except AgentExistsError as exc:
            raise ConflictError(str(exc), param="uuid") from None
        self._shields[agent.uuid] = shields
        return ag.AgenticSystemCreateResponse(agent_uuid=agent.uuid)

    @staticmethod
    def _check_generation(request: ag.AgenticSystemCreateRequest) -> None:
        """What every inference of the agent will use, checked now rather than at its first
        turn: the sampling settings, and each tool's schema as a decoding grammar."""
        engine_sampling(ls.GenerationOptions(model=request.model, sampling_params=request.sampling_params,
                                             max_tokens=request.max_tokens))
        for index, tool in enumerate(spec_tools(request.available_tools)):
            json_constraint(tool.parameters, f"available_tools[{index}].parameters")

    async def _check_banks(self, agent: AgentConfig) -> None:
        for index, bank_uuid in enumerate(agent.memory_bank_uuids):
            field = f"memory_bank_uuids[{index}]"
            if self.runtime.memory is None:
                raise APIError(f"{field}: this server has no memory banks", param=field)
            try:
                await asyncio.to_thread(self.runtime.memory.get_bank, bank_uuid)
            except BankNotFoundError:
                raise NotFoundError(f"{field}: no memory bank {bank_uuid!r}", param=field) from None

    async def _agent(self, agent_uuid: str, field: str) -> AgentConfig:
        try:
            return await asyncio.to_thread(self.store.get, agent_uuid)
        except AgentNotFoundError as exc:
            raise NotFoundError(f"{field}: {exc}", param=field) from None

    async def _chunks(self, request: ag.AgenticSystemExecuteRequest) -> AsyncIterator[StepChunk]:
        for index, msg in enumerate(request.messages):
            if msg.role not in EXECUTE_ROLES:
                raise APIError(f"messages[{index}].role: must be user, or tool (carrying "
                               f"tool_responses), got {msg.role!r}", param=f"messages[{index}].role")
            if msg.role == "tool" and not msg.tool_responses:
                raise APIError(f"messages[{index}].tool_responses: a tool message must carry at "
                               "least one tool response", param=f"messages[{index}].tool_responses")
        agent = await self._agent(request.agent_uuid, "agent_uuid")
        for index, msg in enumerate(request.messages):
            for j, response in enumerate(msg.tool_responses or []):
                name = getattr(response.tool_name, "value", response.tool_name)
                if name not in agent.tool_names:  # answers a call this agent cannot make
                    field = f"messages[{index}].tool_responses[{j}].tool_name"
                    raise APIError(f"{field}: agent {agent.uuid!r} has no tool {name!r} (its "
                                   f"tools: {', '.join(agent.tool_names) or 'none'})", param=field)
        shields = await self._agent_shields(agent)
        turn = Turn(agent, shields, self.runtime,
                    [m.model_dump(mode="json") for m in request.messages],
                    [t.model_dump(mode="json") for t in request.turn_history])
        async for chunk in turn.run():
            yield chunk

    async def execute(self, request: ag.AgenticSystemExecuteRequest) -> ag.AgenticSystemExecuteResponse:
        chunks = [chunk async for chunk in self._chunks(request)]
        turn = assemble_turn([m.model_dump(mode="json") for m in request.messages], chunks)
        return ag.AgenticSystemExecuteResponse.model_validate({"turn": turn})

    async def execute_stream(
            self, request: ag.AgenticSystemExecuteRequest) -> AsyncIterator[ag.AgenticSystemExecuteResponseStreamChunk]:
        async for chunk in self._chunks(request):
            yield ag.AgenticSystemExecuteResponseStreamChunk.model_validate(chunk.to_json())

    async def delete(self, query: ag.AgentQuery) -> None:
        try:
            await asyncio.to_thread(self.store.delete, query.agent_id)
        except AgentNotFoundError as exc:
            raise NotFoundError(f"agent_id: {exc}", param="agent_id") from None
        self._shields.pop(query.agent_id, None)
        await asyncio.to_thread(self.runtime.tools.close_session, query.agent_id)
