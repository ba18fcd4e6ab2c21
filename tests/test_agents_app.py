"""The agents' seams inside the real application on the default model, with stand-ins for
the shields and the sandbox (built on another branch): a guard shield's ``generate`` runs
on the served model from its worker thread (same text as /inference/completion), an output
violation streams no text, a shield refused at create time names its field, a forced
code_interpreter call runs in the agent's session (closed when the agent is deleted), and a
forced web_search call reaches a stub Brave server on the loopback (--web-search-url)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, Callable, Optional

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llama_engine.agents.options import AgentOptions
from llama_engine.agents.tools import ToolsConfig
from llama_engine.agents.web_search import WebSearchConfig
from llama_engine.errors import RequestValidationError
from tests.agent_fakes import EchoCodeInterpreter, Violation, example_tool_turn

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 1024
GUARD_PROMPT = "Is this message safe? Answer safe or unsafe. Message: hello\nAnswer:"


# SmolLM2-135M writes a sound call once it has seen one
CODE_EXAMPLE_TURN = example_tool_turn("Print 2 plus 3 in Python.", "code_interpreter",
                                      {"code": "print(2 + 3)"}, "[stdout]\n5\n", "2 plus 3 is 5.")


SEARCH_EXAMPLE_TURN = example_tool_turn(
    "Search the web for the tallest tree.", "web_search", {"query": "tallest tree"},
    '{"query": "tallest tree", "results": [{"title": "Hyperion", "url": "https://t.example", '
    '"content": "Hyperion is the tallest tree."}]}', "Hyperion is the tallest tree.")
BRAVE_ANSWER = {"web": {"results": [{"title": "Kettle facts", "url": "https://k.example",
                                     "description": "Kettles boil water."}]}}


def guard_prompt_text(task: str) -> str:
    """``task`` as the one user message of the default model's chat template, rendered by
    transformers (the reference for what the guard model is given)."""
    import transformers
    from llama_engine.loader import default_model_path
    folder, name = os.path.split(default_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return tokenizer.apply_chat_template([{"role": "user", "content": task}], tokenize=False,
                                         add_generation_prompt=True)


class GuardShield:
    """Asks the served model (through ``generate``) and flags every answer it checks."""

    def __init__(self, generate: Callable[[str], str]):
        self.generate = generate
        self.guard_outputs: list[str] = []

    def run(self, messages: list[dict[str, Any]]) -> Optional[Violation]:
        self.guard_outputs.append(self.generate(GUARD_PROMPT))
        return Violation("error", "flagged by the test guard", "I won't say that.")


class StandInOptions(AgentOptions):
    """Real options, with the shields and the sandbox replaced by stand-ins."""

    def __init__(self, search_url: str) -> None:
        super().__init__(tools=ToolsConfig(web_search=WebSearchConfig("brave", "KEY", search_url)))
        self.shields: list[GuardShield] = []
        self.code = EchoCodeInterpreter()

    def shield_builder(self):
        def build(shield_type: str, params: dict, generate: Callable[[str], str]) -> GuardShield:
            if params.get("excluded_categories") == ["S99"]:
                raise RequestValidationError("params.excluded_categories", "no category S99")
            self.shields.append(GuardShield(generate))
            return self.shields[-1]
        return build

    def code_interpreter_factory(self, state_dir):
        return lambda: self.code


def run_app(tmp_path, scenario: Callable[[TestClient, StandInOptions], Any]) -> Any:
    from llama_engine.engine.async_engine import AsyncLLMEngine
    from server.api.registry import ModelRegistry, ServedModel
    from server.http.app import build_app

    async def brave(request: web.Request) -> web.Response:
        return web.json_response(BRAVE_ANSWER)

    async def main() -> Any:
        stub = web.Application()
        stub.router.add_get("/search", brave)
        search = TestServer(stub, host="127.0.0.1")
        await search.start_server()
        engine = AsyncLLMEngine.from_model(None, max_model_len=MAX_MODEL_LEN)
        registry = ModelRegistry()
        registry.add(ServedModel(engine.model_id, engine, max_running=8, max_waiting=8))
        options = StandInOptions(str(search.make_url("/search")))
        client = TestClient(TestServer(build_app(registry, state_dir=tmp_path, agent_options=options)))
        await client.start_server()
        try:
            return await scenario(client, options)
        finally:
            await client.close()
            await search.close()
            await engine.shutdown()

    return asyncio.run(main())


async def create(client: TestClient, uuid: str, status: int = 200, **fields: Any) -> Any:
    model = (await (await client.get("/v1/models")).json())["data"][0]["id"]
    body = {"uuid": uuid, "instructions": "You are a helpful assistant.", "model": model,
            "available_tools": [], "executable_tools": [], "memory_bank_uuids": [],
            "input_shields": [], "output_shields": [], "max_tokens": 24, **fields}
    response = await client.post("/agentic_system/create", json=body)
    assert response.status == status, await response.text()
    return model, await response.json()


async def forced_builtin_turn(client: TestClient, agent: str, tool: str, example: dict,
                              question: str) -> tuple[dict, dict]:
    """A turn of a new agent that must call the built-in ``tool`` (run by the server); the
    turn and its tool_execution step."""
    definition = {"tool_name": tool, "input_shields": [], "output_shields": []}
    await create(client, agent, available_tools=[definition], executable_tools=[tool],
                 tool_choice="required", max_infer_iters=2, max_tokens=64)
    body = {"agent_uuid": agent, "messages": [{"role": "user", "content": question}],
            "turn_history": [example], "stream": False}
    turn = (await (await client.post("/agentic_system/execute", json=body)).json())["turn"]
    execution = [s for s in turn["steps"] if s["step_type"] == "tool_execution"]
    assert execution, json.dumps(turn)
    return turn, execution[0]


def test_shields_and_builtin_tools_in_the_app(tmp_path) -> None:
    guard = {"shield_type": "llama_guard", "params": {}}

    async def scenario(client: TestClient, options: StandInOptions) -> None:
        _, error = await create(client, "refused", 400, output_shields=[
            {"shield_type": "llama_guard", "params": {"excluded_categories": ["S99"]}}])
        assert error["error"]["param"] == "output_shields[0].params.excluded_categories"

        model, _ = await create(client, "guarded", output_shields=[guard])
        body = {"agent_uuid": "guarded", "messages": [{"role": "user", "content": "Tell me a story."}],
                "turn_history": [], "stream": True}
        response = await client.post("/agentic_system/execute", json=body)
        chunks = [json.loads(line[len("data: "):]) for line in (await response.text()).splitlines()
                  if line.startswith("data: ")]
        assert all(c["response_text_delta"] is None for c in chunks)
        assert [c["step_type"] for c in chunks] == ["safety_filtering", "safety_filtering"]
        assert chunks[-1]["violation"]["details"] == "flagged by the test guard"
        assert chunks[-1]["response_message"]["content"] == "I won't say that."
        # the guard task goes in as the one user message of the model's chat template
        reference = await (await client.post("/inference/completion", json={
            "model": model, "content": guard_prompt_text(GUARD_PROMPT), "max_tokens": 32})).json()
        assert options.shields[-1].guard_outputs == [reference["content"]]

        turn, execution = await forced_builtin_turn(client, "coder", "code_interpreter", CODE_EXAMPLE_TURN,
                                                    "Print 6 times 7 in Python.")
        [(session, code)] = options.code.calls
        assert session == "coder"
        assert execution["tool_calls"] == [{"tool_name": "code_interpreter", "arguments": {"code": code}}]
        assert execution["tool_responses"][0]["content"][0] == f"[stdout]\nran: {code}\n"
        assert turn["steps"][-1]["step_type"] == "model_inference"
        assert (await client.delete("/agentic_system/delete?agent_id=coder")).status == 200
        assert options.code.closed == ["coder"]

        _, execution = await forced_builtin_turn(client, "searcher", "web_search", SEARCH_EXAMPLE_TURN,
                                                 "Search the web for kettles.")
        [call] = execution["tool_calls"]
        assert json.loads(execution["tool_responses"][0]["content"]) == {"query": call["arguments"]["query"], "results": [
            {"title": "Kettle facts", "url": "https://k.example", "content": "Kettles boil water."}]}

    run_app(tmp_path, scenario)
