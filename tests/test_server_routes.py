"""Every inference route, streaming and not, over real HTTP, against the engine's own offline
greedy output (`LLM.generate`) for the same prompt."""

from __future__ import annotations

import base64
import json
from typing import Any, Iterator

import pytest
import requests

from llama_engine.memory import EMBEDDING_MODEL_ID
from tests.server_process import ServerProcess, running_server

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
MAX_TOKENS = 8
TIMEOUT_S = 300
PROMPT = "The capital of France is"
QUESTION = "Name a color."
SPEC_COMPLETION_MODEL = "llama3_8b"  # spec model names, mapped by --alias
SPEC_CHAT_MODEL = "llama3_8b_chat"


@pytest.fixture(scope="module")
def reference() -> Any:
    from llama_engine import LLM

    return LLM(None, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def server(reference: Any) -> Iterator[ServerProcess]:
    model_id = reference.engine.model_id
    with running_server("--max-model-len", str(MAX_MODEL_LEN),
                        "--alias", f"{SPEC_CHAT_MODEL}={model_id}",
                        "--alias", f"{SPEC_COMPLETION_MODEL}={model_id}") as process:
        yield process


def greedy(reference: Any, prompt_ids: list[int], max_tokens: int | None = MAX_TOKENS, **extra: Any) -> Any:
    from llama_engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **extra)
    return reference.generate(prompt_ids, params)[0].outputs[0]


def completion_ids(reference: Any, text: str) -> list[int]:
    return reference.get_tokenizer().encode(text)


def chat_ids(reference: Any, question: str) -> list[int]:
    return reference.get_tokenizer().apply_chat_template([{"role": "user", "content": question}])


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> requests.Response:
    response = requests.post(server.base_url + path, json=body, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response


def sse_events(response: requests.Response) -> list[Any]:
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream(server: ServerProcess, path: str, body: dict[str, Any]) -> list[Any]:
    with requests.post(server.base_url + path, json={**body, "stream": True}, stream=True,
                       timeout=TIMEOUT_S) as response:
        assert response.status_code == 200, response.text
        return sse_events(response)


# ---- spec Inference API ------------------------------------------------------------------


def test_health_and_models(server: ServerProcess, reference: Any) -> None:
    assert requests.get(f"{server.base_url}/health", timeout=TIMEOUT_S).json()["status"] == "ok"
    models = requests.get(f"{server.base_url}/v1/models", timeout=TIMEOUT_S).json()
    assert [m["id"] for m in models["data"]] == [reference.engine.model_id, EMBEDDING_MODEL_ID]
    assert sorted(models["data"][0]["aliases"]) == [SPEC_COMPLETION_MODEL, SPEC_CHAT_MODEL]


def test_completion_matches_offline_greedy(server: ServerProcess, reference: Any) -> None:
    expected = greedy(reference, completion_ids(reference, PROMPT), logprobs=0)
    body = post(server, "/inference/completion", {"model": SPEC_COMPLETION_MODEL, "content": PROMPT,
                                                  "max_tokens": MAX_TOKENS, "logprobs": True}).json()
    assert body["content"] == expected.text
    assert body["stop_reason"] == "max_tokens"
    chosen = [lp[t] for t, lp in zip(expected.token_ids, expected.logprobs)]
    assert body["logprobs"]["token_logprobs"] == pytest.approx(chosen, abs=1e-4)
    assert "".join(body["logprobs"]["tokens"]) == expected.text


def test_completion_stream_ends_with_stop_reason(server: ServerProcess, reference: Any) -> None:
    expected = greedy(reference, completion_ids(reference, PROMPT))
    chunks = stream(server, "/inference/completion", {"model": SPEC_COMPLETION_MODEL, "content": PROMPT,
                                                      "max_tokens": MAX_TOKENS})
    assert "".join(c["text_delta"] for c in chunks) == expected.text
    assert [c["stop_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["max_tokens"]


def test_attachment_text_is_read(server: ServerProcess, reference: Any) -> None:
    expected = greedy(reference, completion_ids(reference, PROMPT))
    data_url = "data:text/plain;base64," + base64.b64encode(b" France is").decode()
    body = post(server, "/inference/completion", {
        "model": SPEC_COMPLETION_MODEL, "max_tokens": MAX_TOKENS,
        "content": ["The capital of", {"url": data_url, "mime_type": "text/plain"}]}).json()
    assert body["content"] == expected.text


@pytest.mark.parametrize("sampling_params", [
    {"strategy": "top_k", "top_k": 1, "temperature": 1.0},  # sampling from the top-1 is greedy
    {"strategy": "top_p", "top_p": 1e-6, "temperature": 1.0},  # so is a nucleus this small
    {"strategy": "greedy", "temperature": 1.5},  # greedy ignores the temperature
    {"strategy": "top_k", "top_k": 2**40, "temperature": 1e-9},  # beyond float32/int32 ranges
    {"strategy": "top_p", "top_p": 1e-100, "temperature": 1.0},
])
def test_sampling_strategies_that_reduce_to_greedy(server: ServerProcess, reference: Any,
                                                   sampling_params: dict[str, Any]) -> None:
    expected = greedy(reference, completion_ids(reference, PROMPT))
    body = post(server, "/inference/completion", {"model": SPEC_COMPLETION_MODEL, "content": PROMPT,
                                                  "max_tokens": MAX_TOKENS,
                                                  "sampling_params": sampling_params}).json()
    assert body["content"] == expected.text


def test_chat_completion_matches_offline_greedy(server: ServerProcess, reference: Any) -> None:
    expected = greedy(reference, chat_ids(reference, QUESTION))
    body = post(server, "/inference/chat_completion", {
        "model": SPEC_CHAT_MODEL, "max_tokens": MAX_TOKENS,
        "dialog": {"message": {"role": "user", "content": QUESTION}}}).json()
    assert body == {"content": expected.text, "tool_calls": [], "stop_reason": "max_tokens", "logprobs": None}


def test_chat_max_tokens_zero_runs_to_a_stop(server: ServerProcess, reference: Any) -> None:
    expected = greedy(reference, chat_ids(reference, QUESTION), max_tokens=None)
    body = post(server, "/inference/chat_completion", {
        "model": SPEC_CHAT_MODEL, "max_tokens": 0,
        "dialog": {"message": {"role": "user", "content": QUESTION}}}).json()
    assert body["content"] == expected.text
    assert body["stop_reason"] == {"stop": "finished_ok", "length": "max_tokens"}[expected.finish_reason]


def test_chat_completion_stream(server: ServerProcess, reference: Any) -> None:
    expected = greedy(reference, chat_ids(reference, QUESTION))
    chunks = stream(server, "/inference/chat_completion", {
        "model": SPEC_CHAT_MODEL, "max_tokens": MAX_TOKENS,
        "dialog": {"message": {"role": "user", "content": QUESTION}}})
    assert "".join(c["text_delta"] for c in chunks) == expected.text
    assert chunks[-1]["stop_reason"] == "max_tokens"
    assert all(c["stop_reason"] is None and c["tool_call"] is None for c in chunks[:-1])


def test_batch_completion_is_jsonl_in_order(server: ServerProcess, reference: Any) -> None:
    prompts = [PROMPT, "One, two, three,", "Water is made of"]
    response = post(server, "/inference/batch_completion", {
        "model": SPEC_COMPLETION_MODEL, "content_batch": prompts, "max_tokens": MAX_TOKENS})
    assert response.headers["Content-Type"].startswith("application/jsonl")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["content"] for line in lines] == [greedy(reference, completion_ids(reference, p)).text
                                                   for p in prompts]


def test_batch_chat_completion_is_jsonl_in_order(server: ServerProcess, reference: Any) -> None:
    questions = [QUESTION, "Say hello."]
    response = post(server, "/inference/batch_chat_completion", {
        "model": SPEC_CHAT_MODEL, "max_tokens": MAX_TOKENS,
        "batch_dialogs": [{"message": {"role": "user", "content": q}} for q in questions]})
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["content"] for line in lines] == [greedy(reference, chat_ids(reference, q)).text
                                                   for q in questions]


# ---- OpenAI-compatible API, raw HTTP -----------------------------------------------------


def test_openai_completion_with_stop_usage_and_echo(server: ServerProcess, reference: Any) -> None:
    prompt_ids = completion_ids(reference, PROMPT)
    expected = greedy(reference, prompt_ids)
    stop = expected.text[3:6]  # cut the output short, inside its first few characters
    body = post(server, "/v1/completions", {"model": SPEC_COMPLETION_MODEL, "prompt": PROMPT, "temperature": 0,
                                            "max_tokens": MAX_TOKENS, "stop": [stop], "echo": True}).json()
    choice = body["choices"][0]
    assert choice["text"] == PROMPT + expected.text[:expected.text.index(stop)]
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)


def test_openai_completion_n_and_token_prompts(server: ServerProcess, reference: Any) -> None:
    prompt_ids = completion_ids(reference, PROMPT)
    expected = greedy(reference, prompt_ids)
    body = post(server, "/v1/completions", {"model": SPEC_COMPLETION_MODEL, "prompt": [prompt_ids, prompt_ids],
                                            "temperature": 0, "max_tokens": MAX_TOKENS, "n": 2}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == expected.text for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": 2 * len(prompt_ids), "completion_tokens": 4 * MAX_TOKENS,
                             "total_tokens": 2 * len(prompt_ids) + 4 * MAX_TOKENS}


def test_openai_completion_stream(server: ServerProcess, reference: Any) -> None:
    expected = greedy(reference, completion_ids(reference, PROMPT))
    events = stream(server, "/v1/completions", {"model": SPEC_COMPLETION_MODEL, "prompt": PROMPT,
                                                "temperature": 0, "max_tokens": MAX_TOKENS,
                                                "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == MAX_TOKENS
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_openai_chat_stream_with_logprobs(server: ServerProcess, reference: Any) -> None:
    prompt_ids = chat_ids(reference, QUESTION)
    expected = greedy(reference, prompt_ids, logprobs=2)
    events = stream(server, "/v1/chat/completions", {
        "model": SPEC_CHAT_MODEL, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
        "max_tokens": MAX_TOKENS, "logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": MAX_TOKENS,
                                   "total_tokens": len(prompt_ids) + MAX_TOKENS}
    choices = [e["choices"][0] for e in events[:-2]]
    assert choices[0]["delta"]["role"] == "assistant"
    assert "".join(c["delta"]["content"] or "" for c in choices) == expected.text
    assert choices[-1]["finish_reason"] == "length"
    token_logprobs = [entry for c in choices if c["logprobs"] for entry in c["logprobs"]["content"]]
    assert [e["logprob"] for e in token_logprobs] == pytest.approx(
        [lp[t] for t, lp in zip(expected.token_ids, expected.logprobs)], abs=1e-4)
    assert all(len(e["top_logprobs"]) == 2 for e in token_logprobs)


def test_openai_seeded_sampling_matches_offline(server: ServerProcess, reference: Any) -> None:
    from llama_engine import SamplingParams

    prompt_ids = completion_ids(reference, PROMPT)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=MAX_TOKENS)
    expected = reference.generate(prompt_ids, params)[0].outputs[0].text
    body = {"model": SPEC_COMPLETION_MODEL, "prompt": PROMPT, "temperature": 1.0, "top_p": 0.9, "seed": 1234,
            "max_tokens": MAX_TOKENS}
    texts = [post(server, "/v1/completions", body).json()["choices"][0]["text"] for _ in range(2)]
    assert texts == [expected, expected]


def test_openai_chat_stream_with_two_choices_and_a_stop(server: ServerProcess, reference: Any) -> None:
    expected = greedy(reference, chat_ids(reference, QUESTION)).text
    stop = expected[4:7]
    events = stream(server, "/v1/chat/completions", {
        "model": SPEC_CHAT_MODEL, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
        "max_tokens": MAX_TOKENS, "n": 2, "stop": stop})
    assert events[-1] == "[DONE]"
    for index in (0, 1):
        choices = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == index]
        assert choices[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"]["content"] or "" for c in choices) == expected[:expected.index(stop)]
        assert choices[-1]["finish_reason"] == "stop"
