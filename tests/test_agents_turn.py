"""The turn loop on a scripted model: step order and shapes, tools (several per message,
unknown ones, the client's), shields before anything unsafe is streamed, history replay,
tool_choice, max_infer_iters; the agent store and config checks. No model is loaded."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from llama_engine.agents.config import AgentConfig
from llama_engine.agents.steps import assemble_turn
from llama_engine.agents.store import AgentNotFoundError, AgentStore
from llama_engine.agents.tools import BuiltinTools, ToolsConfig
from llama_engine.agents.turn import AgentRuntime, AgentShields, Turn
from llama_engine.errors import RequestValidationError
from tests.agent_fakes import EchoCodeInterpreter, KeywordShield, ScriptedInference, ScriptedOutput

WEATHER = {"tool_name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
           "input_shields": [], "output_shields": []}
MATH = {"tool_name": "math", "description": None, "parameters": None, "input_shields": [], "output_shields": []}
CODE = {**MATH, "tool_name": "code_interpreter"}
USER = {"role": "user", "content": "Hello there", "tool_calls": [], "tool_responses": []}


def agent(**overrides: Any) -> AgentConfig:
    config = dict(uuid="a1", instructions="You are terse.", model="m",
                  available_tools=[MATH, WEATHER, CODE], executable_tools=["math", "code_interpreter"])
    config.update(overrides)
    return AgentConfig(**config)


def run_turn(config: AgentConfig, outputs: list[ScriptedOutput], shields: AgentShields | None = None,
             messages: list[dict] | None = None, history: list[dict] | None = None,
             code: EchoCodeInterpreter | None = None) -> tuple[list, dict, ScriptedInference]:
    model = ScriptedInference(outputs)
    tools = BuiltinTools(ToolsConfig(), (lambda: code) if code else None)
    turn = Turn(config, shields or AgentShields(), AgentRuntime(model, tools), messages or [USER], history or [])

    async def collect() -> list:
        return [chunk async for chunk in turn.run()]

    chunks = asyncio.run(collect())
    return chunks, assemble_turn(messages or [USER], chunks), model


def test_plain_answer_streams_text_and_ends_with_the_response() -> None:
    chunks, turn, model = run_turn(agent(), [ScriptedOutput("Hi! How can I help?")])
    assert [c.event_type for c in chunks] == ["step_start"] + ["step_progress"] * 5 + ["step_end"]
    assert {c.step_type for c in chunks} == {"model_inference"}
    assert "".join(c.response_text_delta or "" for c in chunks) == "Hi! How can I help?"
    assert chunks[-1].stop_reason == "finished_ok"
    assert turn["steps"] == [{"step_type": "model_inference", "uuid": chunks[0].step_uuid,
                              "text": "Hi! How can I help?"}]
    assert turn["response_message"]["content"] == "Hi! How can I help?"
    [request] = model.requests
    assert request.messages[0] == {"role": "system", "content": "You are terse.", "tool_calls": [],
                                   "tool_responses": []}
    assert request.messages[1:] == [USER]


def test_text_is_sent_as_it_is_generated() -> None:
    model = ScriptedInference([ScriptedOutput("one two three four")])
    turn = Turn(agent(), AgentShields(), AgentRuntime(model, BuiltinTools(ToolsConfig())), [USER], [])

    async def deltas_seen_per_chunk() -> list[int]:
        return [model.sent async for chunk in turn.run() if chunk.response_text_delta]

    # each piece reaches the client before the model makes the next one
    assert asyncio.run(deltas_seen_per_chunk()) == [1, 2, 3, 4, 5]


def test_several_builtin_calls_run_and_the_model_reads_their_results() -> None:
    calls = [{"tool_name": "math", "arguments": {"expression": "2^10"}},
             {"tool_name": "math", "arguments": {"expression": "sqrt(8)"}}]
    chunks, turn, model = run_turn(agent(), [ScriptedOutput("", calls), ScriptedOutput("1024 and 2.83")])
    types = [s["step_type"] for s in turn["steps"]]
    assert types == ["model_inference", "tool_execution", "tool_execution", "model_inference"]
    responses = [s["tool_responses"][0]["content"] for s in turn["steps"][1:3]]
    assert responses[0] == "1024"  # 2**10
    assert responses[1].startswith("2*sqrt(2) ≈ 2.828427124746")  # sqrt(8) = 2 sqrt(2)
    assert [s["tool_calls"] for s in turn["steps"][1:3]] == [[calls[0]], [calls[1]]]
    second = model.requests[1].messages
    assert second[-2]["role"] == "assistant" and second[-2]["tool_calls"] == calls
    assert [r["content"] for r in second[-1]["tool_responses"]] == responses
    assert turn["response_message"]["content"] == "1024 and 2.83"


def test_unknown_tool_gets_a_response_and_the_turn_goes_on() -> None:
    call = {"tool_name": "launch_rocket", "arguments": {}}
    _, turn, _ = run_turn(agent(), [ScriptedOutput("", [call]), ScriptedOutput("I cannot.")])
    tool_step = turn["steps"][1]
    assert tool_step["tool_calls"] == [call]
    assert "Unknown tool 'launch_rocket'" in tool_step["tool_responses"][0]["content"]
    assert turn["response_message"]["content"] == "I cannot."


def test_client_tool_call_ends_the_turn_and_its_response_continues_it() -> None:
    call = {"tool_name": "get_weather", "arguments": {"city": "Paris"}}
    config = agent(tool_choice="required")
    _, first, model = run_turn(config, [ScriptedOutput("", [call])])
    assert first["response_message"]["tool_calls"] == [call]
    assert model.requests[0].tool_choice == "required"
    answer = {"role": "tool", "content": "", "tool_calls": [],
              "tool_responses": [{"tool_name": "get_weather", "content": "21 C, sunny"}]}
    _, second, model = run_turn(config, [ScriptedOutput("It is 21 C.")], messages=[answer], history=[first])
    assert model.requests[0].tool_choice == "auto"  # forcing again would loop
    messages = model.requests[0].messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[2]["tool_calls"] == [call]
    assert messages[3]["tool_responses"] == answer["tool_responses"]
    assert second["response_message"]["content"] == "It is 21 C."


def test_history_replays_tool_rounds_in_order() -> None:
    _, earlier, _ = run_turn(agent(), [ScriptedOutput("thinking", [{"tool_name": "math", "arguments": {"expression": "1+1"}}]),
                                       ScriptedOutput("Two.")])
    question = {**USER, "content": "And 3+3?"}
    _, _, model = run_turn(agent(), [ScriptedOutput("Six.")], messages=[question], history=[earlier])
    messages = model.requests[0].messages
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "You are terse."), ("user", "Hello there"), ("assistant", "thinking"), ("tool", ""),
        ("assistant", "Two."), ("user", "And 3+3?")]
    assert messages[3]["tool_responses"][0]["content"] == "2"


def test_output_shield_blocks_before_any_text_is_streamed() -> None:
    shield = KeywordShield("UNSAFE")
    chunks, turn, _ = run_turn(agent(), [ScriptedOutput("here is the UNSAFE plan")],
                               AgentShields(output=[shield]))
    assert all("UNSAFE" not in (c.response_text_delta or "") for c in chunks)
    assert [s["step_type"] for s in turn["steps"]] == ["safety_filtering"]
    assert turn["steps"][0]["violation"]["violation_type"] == "error"
    assert turn["response_message"]["content"] == "Blocked: UNSAFE."
    assert "UNSAFE" in shield.seen[0][-1]["content"]  # it saw the answer


def test_passing_output_shield_comes_before_the_answer() -> None:
    chunks, turn, _ = run_turn(agent(), [ScriptedOutput("fine answer")], AgentShields(output=[KeywordShield("X!")]))
    assert [s["step_type"] for s in turn["steps"]] == ["safety_filtering", "model_inference"]
    assert turn["steps"][0]["violation"] is None
    assert turn["steps"][1]["text"] == "fine answer"


def test_input_shield_refuses_without_running_the_model() -> None:
    chunks, turn, model = run_turn(agent(), [], AgentShields(input=[KeywordShield("Hello")]))
    assert model.requests == []
    assert turn["response_message"]["content"] == "Blocked: Hello."


def test_warn_violation_is_recorded_and_the_turn_goes_on() -> None:
    _, turn, _ = run_turn(agent(), [ScriptedOutput("ok")], AgentShields(input=[KeywordShield("Hello", "warn")]))
    assert turn["steps"][0]["violation"]["violation_type"] == "warn"
    assert turn["response_message"]["content"] == "ok"


def test_tool_output_shield_sees_the_output_and_withholds_it() -> None:
    code = EchoCodeInterpreter()
    shield = KeywordShield("ran: secret")
    call = {"tool_name": "code_interpreter", "arguments": {"code": "secret"}}
    chunks, turn, model = run_turn(agent(), [ScriptedOutput("", [call])],
                                   AgentShields(tool_output={"code_interpreter": [shield]}), code=code)
    assert code.calls == [("a1", "secret")]  # the agent's session
    assert all(c.tool_response_delta is None for c in chunks)
    assert [s["step_type"] for s in turn["steps"]] == ["model_inference", "tool_execution", "safety_filtering"]
    assert turn["response_message"]["content"] == "Blocked: ran: secret."
    assert len(model.requests) == 1


def test_code_interpreter_files_are_attachments_and_the_model_reads_a_note() -> None:
    call = {"tool_name": "code_interpreter", "arguments": {"code": "print(1)"}}
    _, turn, model = run_turn(agent(), [ScriptedOutput("", [call]), ScriptedOutput("done")],
                              code=EchoCodeInterpreter())
    text, attachment = turn["steps"][1]["tool_responses"][0]["content"]
    assert text == "[stdout]\nran: print(1)\n"
    assert attachment == {"url": "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode(),
                          "mime_type": "image/png"}
    seen = model.requests[1].messages[-1]["tool_responses"][0]["content"]
    assert seen == [text, "[image/png attachment]"]


def test_max_infer_iters_bounds_the_loop() -> None:
    call = {"tool_name": "math", "arguments": {"expression": "1+1"}}
    _, turn, model = run_turn(agent(max_infer_iters=3), [ScriptedOutput("", [call])] * 5)
    assert len(model.requests) == 3
    assert [s["step_type"] for s in turn["steps"]].count("tool_execution") == 2


def test_unconfigured_web_search_says_so() -> None:
    config = agent(available_tools=[{**MATH, "tool_name": "web_search"}], executable_tools=["web_search"])
    call = {"tool_name": "web_search", "arguments": {"query": "news"}}
    _, turn, _ = run_turn(config, [ScriptedOutput("", [call]), ScriptedOutput("no")])
    assert "web_search is not configured" in turn["steps"][1]["tool_responses"][0]["content"]


@pytest.mark.parametrize("overrides, field", [
    ({"executable_tools": ["web_search"]}, "executable_tools[0]"),
    ({"executable_tools": ["get_weather"]}, "executable_tools[0]"),
    ({"available_tools": [MATH, MATH]}, "available_tools[1].tool_name"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"available_tools": [], "executable_tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"max_infer_iters": 0}, "max_infer_iters"),
])
def test_config_refusals_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(RequestValidationError) as error:
        agent(**overrides).validate()
    assert error.value.field == field


def test_store_survives_reopening(tmp_path) -> None:
    store = AgentStore(tmp_path)
    config = agent(memory_bank_uuids=["notes"], sampling_params={"temperature": 0.5})
    store.create(config)
    store.close()
    reopened = AgentStore(tmp_path)
    assert reopened.get("a1") == config
    reopened.delete("a1")
    with pytest.raises(AgentNotFoundError):
        reopened.get("a1")
    with pytest.raises(AgentNotFoundError):
        reopened.delete("a1")
    reopened.close()
