"""response_format, forced tool calls and logit_bias over real HTTP on the default model, on
the OpenAI routes and the Llama Stack ones; outputs are checked with json and jsonschema,
bad input must be a 400 naming the field."""

from __future__ import annotations

import json
from typing import Any, Iterator

import jsonschema
import pytest
import requests

from tests.server_process import ServerProcess, running_server

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 512
MAX_TOKENS = 64
TIMEOUT_S = 300
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME_SCHEMA = {"type": "object", "properties": {"timezone": {"enum": ["UTC", "CET", "PST"]}},
               "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_time", "description": "Current time.",
                                      "parameters": TIME_SCHEMA}},
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast.",
                                      "parameters": WEATHER_SCHEMA}},
]
SCHEMAS = {"get_time": TIME_SCHEMA, "get_weather": WEATHER_SCHEMA}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20},
                   "country": {"type": "object", "properties": {"code": {"enum": ["FR", "DE", "IT"]}},
                               "required": ["code"], "additionalProperties": False},
                   "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 16},
                                 "maxItems": 2}},
    "required": ["name", "country", "landmarks"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server("--max-model-len", str(MAX_MODEL_LEN)) as process:
        yield process


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from llama_engine.loader import default_model_path
    from llama_engine.tokenizer import Tokenizer

    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def model_id(server: ServerProcess) -> str:
    return requests.get(server.base_url + "/v1/models", timeout=TIMEOUT_S).json()["data"][0]["id"]


def post(server: ServerProcess, path: str, body: dict[str, Any], status: int = 200) -> Any:
    response = requests.post(server.base_url + path, json=body, timeout=TIMEOUT_S)
    assert response.status_code == status, response.text
    return response.json()


def chat(server: ServerProcess, model_id: str, question: str, status: int = 200, **extra: Any) -> Any:
    body = {"model": model_id, "messages": [{"role": "user", "content": question}],
            "temperature": 0, "max_tokens": MAX_TOKENS, **extra}
    return post(server, "/v1/chat/completions", body, status)


def assert_valid_call(call: dict[str, Any], name: str | None = None) -> None:
    function = call["function"]
    assert function["name"] in SCHEMAS and function["name"] == (name or function["name"])
    jsonschema.validate(json.loads(function["arguments"]), SCHEMAS[function["name"]])


def test_json_schema_response_format_validates(server, model_id):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}}
    choice = chat(server, model_id, "Describe Paris.", response_format=fmt)["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), CITY_SCHEMA)


def test_json_object_on_chat_and_completions(server, model_id):
    content = chat(server, model_id, "Describe a dog.",
                   response_format={"type": "json_object"})["choices"][0]["message"]["content"]
    assert isinstance(json.loads(content), dict)
    # Records the model continues with a short one (a free-form object has no length bound).
    records = '{"name": "Ann", "age": 31}\n{"name": "Bob", "age": 45}\n'
    choice = post(server, "/v1/completions", {
        "model": model_id, "prompt": records, "max_tokens": MAX_TOKENS,
        "temperature": 0, "response_format": {"type": "json_object"}})["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert isinstance(json.loads(choice["text"]), dict)


def test_text_response_format_changes_nothing(server, model_id):
    plain = chat(server, model_id, "Name a color.", max_tokens=8)
    text = chat(server, model_id, "Name a color.", max_tokens=8, response_format={"type": "text"})
    assert text["choices"][0]["message"] == plain["choices"][0]["message"]


def test_named_tool_choice_calls_that_tool(server, model_id):
    """Issue 11 fault 6: a named choice used to leave raw markup in content."""
    choice = chat(server, model_id, "What is the weather in Rome this week?", tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert len(calls) >= 1
    for call in calls:
        assert_valid_call(call, "get_weather")


def test_required_tool_choice_calls_a_listed_tool(server, model_id):
    """Issue 11 fault 6: "required" used to call a tool named function_name."""
    choice = chat(server, model_id, "What time is it?", tools=TOOLS, tool_choice="required",
                  parallel_tool_calls=False)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert_valid_call(call)


def test_forced_tool_call_streams_the_same_call(server, model_id):
    body = {"model": model_id, "temperature": 0, "max_tokens": MAX_TOKENS, "stream": True,
            "messages": [{"role": "user", "content": "Weather in Oslo for 3 days?"}],
            "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    calls, reasons = [], []
    with requests.post(server.base_url + "/v1/chat/completions", json=body, stream=True,
                       timeout=TIMEOUT_S) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                for choice in json.loads(line[len(b"data: "):])["choices"]:
                    calls.extend(choice["delta"].get("tool_calls") or [])
                    reasons += [choice["finish_reason"]] if choice["finish_reason"] else []
    whole = post(server, "/v1/chat/completions", {**body, "stream": False})["choices"][0]
    assert reasons == ["tool_calls"]
    assert [c["function"] for c in calls] == [c["function"] for c in whole["message"]["tool_calls"]]


def test_logit_bias_forces_and_bans(server, model_id, tokenizer):
    banana = tokenizer.encode(" banana", add_special_tokens=False)[0]
    body = {"model": model_id, "prompt": "banana banana banana banana", "max_tokens": 4,
            "temperature": 0, "logprobs": 0}
    forced = post(server, "/v1/completions", {**body, "prompt": "My favourite fruit is",
                                              "logit_bias": {str(banana): 100}})["choices"][0]
    assert forced["text"] == tokenizer.decode([banana] * 4)
    banned = post(server, "/v1/completions", {**body, "logit_bias": {str(banana): -100}})
    assert " banana" not in banned["choices"][0]["logprobs"]["tokens"]


BAD_CHATS = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "no-such-type"}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": 5}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}},
     "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"logit_bias": {"banana": 5}}, "logit_bias"),
    ({"logit_bias": {"10000000": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
]


@pytest.mark.parametrize("extra, field", BAD_CHATS)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_input_is_a_400_naming_the_field(server, model_id, extra, field, stream):
    error = chat(server, model_id, "Hi", status=400, stream=stream, **extra)["error"]
    assert error["param"].startswith(field) or field in error["message"], error


def test_llama_stack_chat_tool_choice_and_response_format(server, model_id):
    tools = [{"tool_name": "get_weather", "description": "Weather forecast.",
              "parameters": WEATHER_SCHEMA},
             {"tool_name": "get_time", "parameters": {
                 "timezone": {"param_type": "str", "description": "A zone name"}}}]
    body = {"model": model_id, "max_tokens": MAX_TOKENS, "available_tools": tools,
            "dialog": {"message": {"role": "user", "content": "Weather in Rome?"}}}
    named = post(server, "/inference/chat_completion", {**body, "tool_choice": "get_weather"})
    assert named["tool_calls"] and all(c["tool_name"] == "get_weather" for c in named["tool_calls"])
    for call in named["tool_calls"]:
        jsonschema.validate(call["arguments"], WEATHER_SCHEMA)
    required = post(server, "/inference/chat_completion", {**body, "tool_choice": "required"})
    assert required["tool_calls"]
    assert {c["tool_name"] for c in required["tool_calls"]} <= {"get_weather", "get_time"}
    error = post(server, "/inference/chat_completion", {**body, "tool_choice": "get_stock"},
                 status=400)["error"]
    assert error["param"] == "tool_choice"
    formatted = post(server, "/inference/completion", {
        "model": model_id, "content": "A city in JSON:", "max_tokens": MAX_TOKENS,
        "response_format": {"type": "json_schema", "json_schema": CITY_SCHEMA}})
    jsonschema.validate(json.loads(formatted["content"]), CITY_SCHEMA)
