"""The AgenticSystem API over real HTTP on the default model (SmolLM2-135M): a custom tool
under tool_choice required, a memory bank with an invented fact, streamed chunk shapes, the
non-streaming turn equal to the assembled stream, refusals naming the field, agents kept
across a kill -9 and restart, step latencies in /metrics."""

from __future__ import annotations

import base64
import json
import signal
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import requests

from tests.agent_fakes import example_tool_turn
from tests.server_process import ServerProcess, running_server

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 1024
MAX_TOKENS = 40
TIMEOUT_S = 300
MODEL = "llama3_8b_chat"  # the spec's name, mapped by --alias
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                  "required": ["city"], "additionalProperties": False}
WEATHER = {"tool_name": "get_weather", "description": "Get the current weather for a city",
           "parameters": WEATHER_SCHEMA, "input_shields": [], "output_shields": []}
FACT = "The secret password of the Zorblax lab is PURPLE-HERON-42."
DISTRACTOR = "Zorvian tea is brewed from roasted acorn shells and blue mint."
# SmolLM2-135M answers from a tool's result once it has seen one exchange like it.
EXAMPLE_TURN = example_tool_turn("What is the weather in Rome?", "get_weather", {"city": "Rome"},
                                 "It is 18 degrees and cloudy in Rome.", "It is 18 degrees and cloudy in Rome.")
EVENT_TYPES = {"step_start", "step_progress", "step_end"}
STEP_TYPES = {"model_inference", "tool_execution", "safety_filtering", "memory_retrieval"}
# The payload fields each step type may carry in a chunk (the spec's chunk, plus score and
# response_message on the last one)
STEP_PAYLOADS = {"model_inference": {"response_text_delta", "stop_reason"},
                 "tool_execution": {"tool_call", "tool_response_delta"},
                 "safety_filtering": {"violation"},
                 "memory_retrieval": {"retrieved_document", "score"}}
PAYLOAD_FIELDS = set().union(*STEP_PAYLOADS.values()) | {"response_message"}


def server_args() -> list[str]:
    from llama_engine.loader import default_model_path
    return ["--max-model-len", str(MAX_MODEL_LEN), "--alias",
            f"{MODEL}={Path(default_model_path()).name}"]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server(*server_args()) as process:
        yield process


def post(server: ServerProcess, path: str, body: Any, status: int = 200) -> Any:
    response = requests.post(server.base_url + path, json=body, timeout=TIMEOUT_S)
    assert response.status_code == status, response.text
    return response.json()


def create(server: ServerProcess, uuid: str, status: int = 200, **fields: Any) -> Any:
    body = {"uuid": uuid, "instructions": "You are a helpful assistant.", "model": MODEL,
            "available_tools": [], "executable_tools": [], "memory_bank_uuids": [],
            "input_shields": [], "output_shields": [], "max_tokens": MAX_TOKENS, **fields}
    return post(server, "/agentic_system/create", body, status)


def execute(server: ServerProcess, agent: str, messages: list[dict], history: list[dict] = ()) -> dict:
    body = {"agent_uuid": agent, "messages": messages, "turn_history": list(history), "stream": False}
    return post(server, "/agentic_system/execute", body)["turn"]


def execute_stream(server: ServerProcess, agent: str, messages: list[dict]) -> list[dict]:
    body = {"agent_uuid": agent, "messages": messages, "turn_history": [], "stream": True}
    with requests.post(server.base_url + "/agentic_system/execute", json=body, stream=True,
                       timeout=TIMEOUT_S) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return [json.loads(line[len(b"data: "):]) for line in response.iter_lines()
                if line.startswith(b"data: ")]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assemble(chunks: list[dict], user_messages: list[dict]) -> dict:
    """The turn a client builds from the chunks, written from the spec's field meanings."""
    steps: dict[str, dict] = {}
    for chunk in chunks:
        step = steps.setdefault(chunk["step_uuid"], {"step_type": chunk["step_type"], "uuid": chunk["step_uuid"]})
        kind = chunk["step_type"]
        if kind == "model_inference":
            step.setdefault("text", "")
            step["text"] += chunk["response_text_delta"] or ""
        elif kind == "tool_execution":
            step.setdefault("tool_calls", []).extend([chunk["tool_call"]] if chunk["tool_call"] else [])
            step.setdefault("tool_responses", []).extend(
                [chunk["tool_response_delta"]] if chunk["tool_response_delta"] else [])
        elif kind == "memory_retrieval":
            if chunk["retrieved_document"]:
                step.setdefault("documents", []).append(chunk["retrieved_document"])
                step.setdefault("scores", []).append(chunk["score"])
        elif chunk["event_type"] == "step_end":
            step["violation"] = chunk["violation"]
    return {"user_messages": user_messages, "steps": list(steps.values()),
            "response_message": chunks[-1]["response_message"]}


def without_uuids(turn: dict) -> dict:
    """Step uuids are fresh each run; everything else must match."""
    steps = [{k: v for k, v in step.items() if k not in ("uuid", "logprobs")} for step in turn["steps"]]
    return {**turn, "steps": steps}


def test_custom_tool_required_then_answered_from_its_response(server: ServerProcess) -> None:
    create(server, "weather", available_tools=[WEATHER], tool_choice="required")
    first = execute(server, "weather", [user("What is the weather in Paris?")], [EXAMPLE_TURN])
    [call] = first["response_message"]["tool_calls"]
    assert call["tool_name"] == "get_weather"
    jsonschema.validate(call["arguments"], WEATHER_SCHEMA)
    assert [s["step_type"] for s in first["steps"]] == ["model_inference"]
    response = {"role": "tool", "content": "",
                "tool_responses": [{"tool_name": "get_weather", "content": "It is 21 degrees and sunny in Paris."}]}
    second = execute(server, "weather", [response], [EXAMPLE_TURN, first])
    assert second["response_message"]["tool_calls"] == []
    assert "21 degrees" in second["response_message"]["content"]


def test_memory_bank_fact_is_retrieved_and_used(server: ServerProcess) -> None:
    documents = [{"uuid": uuid, "content": base64.b64encode(text.encode()).decode(), "mime_type": "text/plain",
                  "metadata": {}} for uuid, text in (("lab", FACT), ("tea", DISTRACTOR))]
    post(server, "/memory_banks/create?bank_uuid=facts&bank_name=Facts", documents)
    create(server, "librarian", memory_bank_uuids=["facts"])
    turn = execute(server, "librarian", [user("What is the secret password of the Zorblax lab?")])
    retrieval, inference = turn["steps"]
    assert retrieval["step_type"] == "memory_retrieval"
    assert retrieval["documents"][0]["uuid"] == "lab"
    assert base64.b64decode(retrieval["documents"][0]["content"]).decode() == FACT
    assert retrieval["scores"][0] > retrieval["scores"][1]
    assert "PURPLE-HERON-42" in turn["response_message"]["content"]
    assert inference["text"] == turn["response_message"]["content"]


def test_stream_chunks_have_the_spec_shape_and_assemble_into_the_turn(server: ServerProcess) -> None:
    create(server, "streamer")
    messages = [user("Name a colour.")]
    chunks = execute_stream(server, "streamer", messages)
    open_steps: list[str] = []
    for chunk in chunks:
        assert chunk["event_type"] in EVENT_TYPES and chunk["step_type"] in STEP_TYPES
        assert isinstance(chunk["step_uuid"], str) and chunk["step_uuid"]
        present = {k for k in PAYLOAD_FIELDS if chunk.get(k) is not None}
        allowed = STEP_PAYLOADS[chunk["step_type"]] | ({"response_message"} if chunk is chunks[-1] else set())
        assert present <= allowed, chunk
        if chunk["event_type"] == "step_start":
            open_steps.append(chunk["step_uuid"])
        else:
            assert chunk["step_uuid"] in open_steps
    assert chunks[0]["event_type"] == "step_start" and chunks[-1]["event_type"] == "step_end"
    assert any(c["response_text_delta"] for c in chunks)
    assert chunks[-1]["stop_reason"] in ("finished_ok", "max_tokens")
    whole = execute(server, "streamer", messages)
    assert without_uuids(assemble(chunks, whole["user_messages"])) == without_uuids(whole)


def test_memory_turn_streams_the_same_as_it_answers(server: ServerProcess) -> None:
    messages = [user("What is the secret password of the Zorblax lab?")]
    chunks = execute_stream(server, "librarian", messages)
    whole = execute(server, "librarian", messages)
    assert without_uuids(assemble(chunks, whole["user_messages"])) == without_uuids(whole)


BAD_CREATES = [
    ({"executable_tools": ["web_search"]}, 400, "executable_tools[0]"),
    ({"available_tools": [WEATHER], "executable_tools": ["get_weather"]}, 400, "executable_tools[0]"),
    ({"input_shields": [{"shield_type": "no_such_guard", "params": {}}]}, 400, "input_shields[0].shield_type"),
    ({"memory_bank_uuids": ["no-such-bank"]}, 404, "memory_bank_uuids[0]"),
    ({"model": "llama3_70b_chat"}, 404, "model"),
    ({"tool_choice": "always"}, 400, "tool_choice"),
    ({"max_infer_iters": 0}, 400, "max_infer_iters"),
    ({"available_tools": [{**WEATHER, "parameters": {"type": "object", "properties": 5}}]}, 400,
     "available_tools[0].parameters"),
    ({"sampling_params": {"strategy": "top_k", "top_k": 0}}, 400, "sampling_params.top_k"),
    # neither an object schema nor a map of parameter definitions
    ({"available_tools": [{**WEATHER, "parameters": {"type": "bogus"}}]}, 400,
     "available_tools[0].parameters.type"),
    ({"max_tokens": 1_000_000_000}, 400, "max_tokens"),  # no room left for any prompt
]


@pytest.mark.parametrize("fields, status, param", BAD_CREATES)
def test_bad_create_names_the_field(server: ServerProcess, fields: dict, status: int, param: str) -> None:
    error = create(server, "bad", status, **fields)["error"]
    assert error["param"] == param and error["message"].startswith(param), error


def test_bad_execute_and_delete_name_the_field(server: ServerProcess) -> None:
    for stream in (False, True):
        body = {"agent_uuid": "nobody", "messages": [user("hi")], "turn_history": [], "stream": stream}
        assert post(server, "/agentic_system/execute", body, 404)["error"]["param"] == "agent_uuid"
    create(server, "plain")
    body = {"agent_uuid": "plain", "messages": [{"role": "assistant", "content": "hi"}], "turn_history": [], "stream": False}
    assert post(server, "/agentic_system/execute", body, 400)["error"]["param"] == "messages[0].role"
    body["messages"] = [{"role": "tool", "content": "", "tool_responses": [
        {"tool_name": "get_weather", "content": "sunny"}]}]  # a tool the agent does not have
    assert (post(server, "/agentic_system/execute", body, 400)["error"]["param"]
            == "messages[0].tool_responses[0].tool_name")
    assert create(server, "plain", 409)["error"]["param"] == "uuid"
    response = requests.delete(f"{server.base_url}/agentic_system/delete?agent_id=plain", timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    response = requests.delete(f"{server.base_url}/agentic_system/delete?agent_id=plain", timeout=TIMEOUT_S)
    assert response.status_code == 404 and response.json()["error"]["param"] == "agent_id"


def test_step_latencies_are_prometheus_histograms(server: ServerProcess) -> None:
    create(server, "timed")
    execute(server, "timed", [user("Hi")])
    metrics = requests.get(server.base_url + "/metrics", timeout=TIMEOUT_S).text
    assert "# TYPE llama_engine_agent_step_seconds histogram" in metrics
    counts = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("llama_engine_agent_step_seconds_count")}
    assert counts['step_type="model_inference"'] >= 1


def test_agents_survive_kill_and_restart(tmp_path) -> None:
    state = ["--state-dir", str(tmp_path)]
    with running_server(*server_args(), *state) as first:
        create(first, "durable", available_tools=[WEATHER], max_tokens=8)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
    with running_server(*server_args(), *state) as second:
        turn = execute(second, "durable", [user("Hi")])
        assert turn["steps"][0]["step_type"] == "model_inference"
        assert create(second, "durable", 409)["error"]["param"] == "uuid"
