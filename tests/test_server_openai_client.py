"""The official `openai` package, unmodified, against the server; and a tool-call round trip
on the default model through both APIs."""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
import requests

from llama_engine.memory.embedding import EMBEDDING_MODEL_ID
from tests.server_process import ServerProcess, running_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 512
MAX_TOKENS = 8
TOOL_MAX_TOKENS = 40
TIMEOUT_S = 300
QUESTION = "Name a color."
WEATHER_QUESTION = "What is the weather in Paris?"
WEATHER_FUNCTION = {"name": "get_weather", "description": "Get the current weather for a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                   "required": ["city"]}}


@pytest.fixture(scope="module")
def reference() -> Any:
    from llama_engine import LLM

    return LLM(None, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server("--max-model-len", str(MAX_MODEL_LEN)) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Any:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


@pytest.fixture(scope="module")
def model_id(client: Any) -> str:
    return client.models.list().data[0].id


def greedy_text(reference: Any, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> str:
    from llama_engine import SamplingParams

    return reference.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))[0].outputs[0].text


def test_models_list(client: Any, reference: Any) -> None:
    # the served model, then the embedding model behind /v1/embeddings
    assert [m.id for m in client.models.list().data] == [reference.engine.model_id,
                                                         EMBEDDING_MODEL_ID]


def test_chat_completions_create(client: Any, model_id: str, reference: Any) -> None:
    prompt_ids = reference.get_tokenizer().apply_chat_template([{"role": "user", "content": QUESTION}])
    response = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": QUESTION}],
                                              temperature=0, max_tokens=MAX_TOKENS, seed=1)
    assert response.choices[0].message.content == greedy_text(reference, prompt_ids)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == MAX_TOKENS


def test_chat_completions_create_stream(client: Any, model_id: str, reference: Any) -> None:
    prompt_ids = reference.get_tokenizer().apply_chat_template([{"role": "user", "content": QUESTION}])
    chunks = list(client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_text(reference, prompt_ids)
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_completions_create(client: Any, model_id: str, reference: Any) -> None:
    prompt = "The capital of France is"
    expected = greedy_text(reference, reference.get_tokenizer().encode(prompt))
    response = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                         logprobs=1)
    assert response.choices[0].text == expected
    assert "".join(response.choices[0].logprobs.tokens) == expected
    streamed = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_client_sees_errors_as_exceptions(client: Any) -> None:
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], temperature=9)


# ---- tool calls on the default model ----------------------------------------------------
# SmolLM2-135M rarely calls a tool zero-shot; each attempt below adds help, and the first that
# yields a call ends the loop. The last attempt shows one earlier call in the history.

def spec_attempts(model_id: str) -> list[dict[str, Any]]:
    tool = {"tool_name": "get_weather", "description": WEATHER_FUNCTION["description"],
            "parameters": {"city": {"param_type": "string", "description": "City name", "required": True}}}
    ask = {"role": "system", "content": "Answer weather questions by calling get_weather."}
    example = [{"role": "user", "content": "What is the weather in London?"},
               {"role": "assistant", "content": "",
                "tool_calls": [{"tool_name": "get_weather", "arguments": {"city": "London"}}]}]
    return [{"model": model_id, "available_tools": [tool], "max_tokens": TOOL_MAX_TOKENS,
             "dialog": {"message": {"role": "user", "content": WEATHER_QUESTION}, "message_history": history}}
            for history in ([], [ask], [ask, *example])]


def test_spec_tool_call_round_trip(server: ServerProcess, model_id: str) -> None:
    for attempt in spec_attempts(model_id):
        body = requests.post(f"{server.base_url}/inference/chat_completion", json=attempt, timeout=TIMEOUT_S).json()
        if body["tool_calls"]:
            break
    assert body["tool_calls"][0]["tool_name"] == "get_weather"
    assert body["tool_calls"][0]["arguments"] == {"city": "Paris"}
    # the same request, streamed: the call arrives whole, in one chunk, before the stop reason
    with requests.post(f"{server.base_url}/inference/chat_completion", json={**attempt, "stream": True},
                       stream=True, timeout=TIMEOUT_S) as response:
        chunks = [json.loads(line[len("data: "):]) for line in response.iter_lines(decode_unicode=True)
                  if line.startswith("data: ")]
    calls = [c["tool_call"] for c in chunks if c["tool_call"]]
    assert calls == body["tool_calls"]
    assert chunks[-1]["stop_reason"] == "finished_ok"
    # and the answer to the tool's result renders back into a valid prompt
    follow_up = {**attempt, "dialog": {"message": {"role": "tool", "content": "", "tool_responses": [
        {"tool_name": "get_weather", "content": "18 C, sunny"}]}, "message_history": [
        *attempt["dialog"]["message_history"], attempt["dialog"]["message"],
        {"role": "assistant", "content": "", "tool_calls": body["tool_calls"]}]}}
    answer = requests.post(f"{server.base_url}/inference/chat_completion", json=follow_up, timeout=TIMEOUT_S)
    assert answer.status_code == 200 and answer.json()["stop_reason"] in ("finished_ok", "max_tokens")


def test_openai_tool_call_round_trip(client: Any, model_id: str) -> None:
    tools = [{"type": "function", "function": WEATHER_FUNCTION}]
    history = [{"role": "user", "content": "What is the weather in London?"},
               {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": json.dumps({"city": "London"})}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "12 C, cloudy"},
               {"role": "assistant", "content": "It is 12 C and cloudy in London."}]
    attempts = [[], [{"role": "system", "content": "Answer weather questions by calling get_weather."}],
                history[:2]]
    for prefix in attempts:
        messages = [*prefix, {"role": "user", "content": WEATHER_QUESTION}]
        response = client.chat.completions.create(model=model_id, messages=messages, tools=tools, temperature=0,
                                                  max_tokens=TOOL_MAX_TOKENS)
        if response.choices[0].message.tool_calls:
            break
    call = response.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert response.choices[0].finish_reason == "tool_calls"
    streamed = list(client.chat.completions.create(model=model_id, messages=messages, tools=tools,
                                                   temperature=0, max_tokens=TOOL_MAX_TOKENS, stream=True))
    deltas = [d for c in streamed for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [("get_weather", {"city": "Paris"})]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    # a full history with a tool result renders and generates
    after = client.chat.completions.create(model=model_id, messages=history, tools=tools, temperature=0,
                                           max_tokens=MAX_TOKENS)
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")
