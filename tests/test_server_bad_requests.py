"""A table of bad requests: each gets the right 4xx and a JSON error naming the problem, and
the server keeps serving afterwards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import pytest
import requests

from tests.lora_cases import write_peft_adapter
from tests.server_process import ServerProcess, running_server

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256  # small, so an over-long prompt is cheap to send
MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 120
CHAT_OK = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
SPEC_DIALOG = {"message": {"role": "user", "content": "Hi"}}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@dataclass
class BadRequest:
    name: str
    path: str
    body: Any  # a dict is sent as JSON; bytes as they are
    status: int
    field: str  # the field the error must name (in `param` and in the message)
    reason: str  # a phrase the message must contain
    method: str = "POST"


def spec(**fields: Any) -> dict[str, Any]:
    return {"model": "{model}", **fields}


CASES = [
    BadRequest("invalid json", "/inference/completion", b'{"model": ', 400, "body", "invalid JSON"),
    BadRequest("json array body", "/inference/completion", b"[1, 2]", 400, "body", "must be a JSON object"),
    BadRequest("empty body", "/v1/completions", b"", 400, "body", "must be a JSON object"),
    BadRequest("nan literal", "/v1/chat/completions", b'{"model": "m", "temperature": NaN}', 400, "body", "NaN"),
    BadRequest("unpaired surrogate", "/v1/completions", b'{"model": "m", "prompt": ["ok", "a\\udbb3"]}', 400,
               "prompt[1]", "unpaired UTF-16 surrogate"),
    BadRequest("deeply nested json", "/inference/completion", b'{"content": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
               400, "body", "nested too deeply"),
    BadRequest("missing model", "/inference/completion", {"content": "Hi"}, 400, "model", "field required"),
    BadRequest("missing content", "/inference/completion", spec(), 400, "content", "field required"),
    BadRequest("missing dialog", "/inference/chat_completion", spec(), 400, "dialog", "field required"),
    BadRequest("unknown field", "/inference/completion", spec(content="Hi", temprature=0.5), 400,
               "temprature", "unknown field"),
    BadRequest("unknown nested field", "/inference/completion",
               spec(content="Hi", sampling_params={"temp": 1}), 400, "sampling_params.temp", "unknown field"),
    BadRequest("wrong type max_tokens", "/inference/completion", spec(content="Hi", max_tokens="ten"), 400,
               "max_tokens", "valid integer"),
    BadRequest("negative max_tokens", "/inference/completion", spec(content="Hi", max_tokens=-1), 400,
               "max_tokens", "greater than or equal to 0"),
    BadRequest("negative temperature", "/inference/completion",
               spec(content="Hi", sampling_params={"temperature": -1}), 400,
               "sampling_params.temperature", "greater than or equal to 0"),
    BadRequest("top_p zero", "/inference/completion", spec(content="Hi", sampling_params={"top_p": 0}),
               400, "sampling_params.top_p", "greater than 0"),
    BadRequest("unknown strategy", "/inference/completion",
               spec(content="Hi", sampling_params={"strategy": "beam"}), 400, "sampling_params.strategy",
               "'greedy', 'top_p' or 'top_k'"),
    BadRequest("top_k strategy without k", "/inference/completion",
               spec(content="Hi", sampling_params={"strategy": "top_k", "top_k": 0}), 400,
               "sampling_params.top_k", "must be >= 1"),
    BadRequest("unknown model", "/inference/completion", {"model": "llama3_70b", "content": "Hi"}, 404,
               "model", "unknown model 'llama3_70b'; available"),
    BadRequest("image attachment", "/inference/completion",
               spec(content=["Describe: ", {"url": "https://example.com/cat.png", "mime_type": "image/png"}]),
               400, "content[1]", "cannot read 'image/png'"),
    BadRequest("attachment url scheme", "/inference/completion",
               spec(content={"url": "ftp://example.com/a.txt", "mime_type": "text/plain"}), 400,
               "content.url", "should match pattern"),
    BadRequest("unknown role", "/inference/chat_completion",
               spec(dialog={"message": {"role": "robot", "content": "Hi"}}), 400, "dialog.message.role",
               "'system', 'user', 'assistant' or 'tool'"),
    BadRequest("over-long prompt", "/inference/completion", spec(content="hello " * (MAX_MODEL_LEN * 2)), 400,
               "content", f"context length is {MAX_MODEL_LEN} tokens"),
    BadRequest("empty prompt", "/inference/completion", spec(content=""), 400, "content", "must not be empty"),
    BadRequest("empty batch", "/inference/batch_completion", spec(content_batch=[]), 400, "content_batch",
               "at least 1 item"),
    BadRequest("body too large", "/inference/completion", spec(content="x" * (MAX_BODY_BYTES + 1)), 413,
               "body", "larger than the server's limit"),
    BadRequest("no messages", "/v1/chat/completions", {"model": "{model}", "messages": []}, 400, "messages",
               "at least 1 item"),
    BadRequest("temperature above 2", "/v1/chat/completions", {"model": "{model}", **CHAT_OK, "temperature": 3},
               400, "temperature", "less than or equal to 2"),
    BadRequest("n zero", "/v1/chat/completions", {"model": "{model}", **CHAT_OK, "n": 0}, 400, "n",
               "greater than or equal to 1"),
    BadRequest("five stop sequences", "/v1/chat/completions",
               {"model": "{model}", **CHAT_OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4 items"),
    BadRequest("empty stop string", "/v1/completions", {"model": "{model}", "prompt": "Hi", "stop": [""]}, 400,
               "stop", "must be non-empty strings"),
    BadRequest("image part", "/v1/chat/completions",
               {"model": "{model}", "messages": [{"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
               400, "messages[0].content[0]", "cannot read image_url"),
    BadRequest("top_logprobs too many", "/v1/chat/completions",
               {"model": "{model}", **CHAT_OK, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs",
               "less than or equal to 20"),
    BadRequest("unknown tool_call_id", "/v1/chat/completions",
               {"model": "{model}", "messages": [{"role": "user", "content": "Hi"},
                                                 {"role": "tool", "content": "18 C", "tool_call_id": "call_x"}]},
               400, "messages[1].tool_call_id", "no earlier assistant tool call"),
    BadRequest("tool call arguments not json", "/v1/chat/completions",
               {"model": "{model}", "messages": [
                   {"role": "user", "content": "Hi"},
                   {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                         "function": {"name": "f", "arguments": "{oops"}}]}]},
               400, "messages[1].tool_calls[0].function.arguments", "JSON object"),
    BadRequest("bad function name", "/v1/chat/completions",
               {"model": "{model}", **CHAT_OK, "tools": [{"type": "function", "function": {"name": "get weather"}}]},
               400, "tools[0].function.name", "should match pattern"),
    BadRequest("tool_choice not in tools", "/v1/chat/completions",
               {"model": "{model}", **CHAT_OK, "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
               400, "tool_choice.function.name", "'get_time' is not in tools"),
    BadRequest("token id outside vocabulary", "/v1/completions", {"model": "{model}", "prompt": [1, 10_000_000]},
               400, "prompt", "token ids must be integers in"),
    BadRequest("completion logprobs above 5", "/v1/completions", {"model": "{model}", "prompt": "Hi", "logprobs": 9},
               400, "logprobs", "less than or equal to 5"),
    BadRequest("prompt of mixed types", "/v1/completions", {"model": "{model}", "prompt": ["a", 1]}, 400,
               "prompt[1]", "valid string"),
    # max_tokens past the context: a 400 with the context length, the prompt's tokens and the
    # tokens asked for (issue 11 fault 7), whichever field asked
    BadRequest("max_tokens beyond the context", "/v1/completions",
               {"model": "{model}", "prompt": [1, 2, 3], "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens",
               f"context length is {MAX_MODEL_LEN} tokens; the prompt is 3 tokens and max_tokens asks "
               f"for {MAX_MODEL_LEN} more ({MAX_MODEL_LEN + 3} in all)"),
    BadRequest("max_tokens beyond the context, second prompt", "/v1/completions",
               {"model": "{model}", "prompt": [[1], [1] * (MAX_MODEL_LEN - 2)], "max_tokens": 4}, 400,
               "max_tokens", f"the prompt is {MAX_MODEL_LEN - 2} tokens"),
    BadRequest("max_completion_tokens beyond the context", "/v1/chat/completions",
               {"model": "{model}", **CHAT_OK, "max_tokens": None, "max_completion_tokens": MAX_MODEL_LEN}, 400,
               "max_completion_tokens", f"context length is {MAX_MODEL_LEN} tokens"),
    BadRequest("chat max_tokens beyond the context", "/v1/chat/completions",
               {"model": "{model}", **CHAT_OK, "max_tokens": 10 * MAX_MODEL_LEN}, 400, "max_tokens",
               f"asks for {10 * MAX_MODEL_LEN} more"),
    BadRequest("spec max_tokens beyond the context", "/inference/chat_completion",
               spec(dialog=SPEC_DIALOG, max_tokens=MAX_MODEL_LEN), 400, "max_tokens", "context length"),
    # fields that mean something only beside another (fault 8)
    BadRequest("top_logprobs without logprobs", "/v1/chat/completions",
               {"model": "{model}", **CHAT_OK, "top_logprobs": 2}, 400, "top_logprobs", "logprobs is true"),
    BadRequest("top_logprobs with logprobs false", "/v1/chat/completions",
               {"model": "{model}", **CHAT_OK, "logprobs": False, "top_logprobs": 0}, 400, "top_logprobs",
               "logprobs is true"),
    BadRequest("chat stream_options without stream", "/v1/chat/completions",
               {"model": "{model}", **CHAT_OK, "stream_options": {"include_usage": True}}, 400, "stream_options",
               "stream is true"),
    BadRequest("completion stream_options with stream false", "/v1/completions",
               {"model": "{model}", "prompt": "Hi", "stream": False, "stream_options": {"include_usage": True}},
               400, "stream_options", "stream is true"),
    # JSON's own types, strictly (fault 9), on both APIs
    *[BadRequest(f"{path} {field} as {json.dumps(value)}", path, {**base, field: value}, 400, field, reason)
      for path, base in (("/v1/completions", {"model": "{model}", "prompt": "Hi"}),
                         ("/v1/chat/completions", {"model": "{model}", **CHAT_OK}))
      for field, value, reason in (("temperature", "0.5", "valid number"), ("top_p", True, "valid number"),
                                   ("n", 1.0, "valid integer"), ("n", "2", "valid integer"),
                                   ("max_tokens", "10", "valid integer"), ("max_tokens", 4.0, "valid integer"),
                                   ("seed", "4", "valid integer"), ("stream", "true", "valid boolean"),
                                   ("stream", 1, "valid boolean"), ("presence_penalty", "1", "valid number"),
                                   ("top_k", 2.0, "valid integer"), ("stop", 5, "valid string"))],
    BadRequest("echo as a string", "/v1/completions", {"model": "{model}", "prompt": "Hi", "echo": "true"}, 400,
               "echo", "valid boolean"),
    BadRequest("completion logprobs as a boolean", "/v1/completions",
               {"model": "{model}", "prompt": "Hi", "logprobs": True}, 400, "logprobs", "valid integer"),
    BadRequest("chat logprobs as a number", "/v1/chat/completions", {"model": "{model}", **CHAT_OK, "logprobs": 1},
               400, "logprobs", "valid boolean"),
    BadRequest("message content as a number", "/v1/chat/completions",
               {"model": "{model}", "messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content",
               "valid"),
    BadRequest("model as a number", "/v1/completions", {"model": 7, "prompt": "Hi"}, 400, "model", "valid string"),
    BadRequest("spec max_tokens as a float", "/inference/completion", spec(content="Hi", max_tokens=4.0), 400,
               "max_tokens", "valid integer"),
    BadRequest("spec logprobs as a string", "/inference/completion", spec(content="Hi", logprobs="true"), 400,
               "logprobs", "valid boolean"),
    BadRequest("spec stream as a number", "/inference/chat_completion", spec(dialog=SPEC_DIALOG, stream=0), 400,
               "stream", "valid boolean"),
    BadRequest("spec temperature as a string", "/inference/completion",
               spec(content="Hi", sampling_params={"strategy": "top_p", "temperature": "0.7"}), 400,
               "sampling_params.temperature", "valid number"),
    BadRequest("spec top_k as a float", "/inference/completion",
               spec(content="Hi", sampling_params={"strategy": "top_k", "top_k": 3.0}), 400,
               "sampling_params.top_k", "valid integer"),
    BadRequest("spec strategy as a number", "/inference/completion",
               spec(content="Hi", sampling_params={"strategy": 1}), 400, "sampling_params.strategy",
               "'greedy', 'top_p' or 'top_k'"),
    BadRequest("unknown route", "/v1/audio/speech", {"model": "{model}", "input": "Hi"}, 404, "path", "no such route"),
    BadRequest("wrong method", "/inference/completion", None, 405, "method", "not allowed", method="GET"),
    # LoRA adapters: the server runs with `--lora good=...` and max_lora_rank 16; the
    # adapter folders are made by the `adapters` fixture ("{adapters}").
    BadRequest("adapter missing path", "/v1/load_lora_adapter",
               {"lora_name": "x1", "lora_path": "{adapters}/absent"}, 400, "lora_path", "does not exist"),
    BadRequest("adapter corrupt safetensors", "/v1/load_lora_adapter",
               {"lora_name": "x2", "lora_path": "{adapters}/corrupt"}, 400, "lora_path",
               "cannot read adapter weights"),
    BadRequest("adapter rank above the limit", "/v1/load_lora_adapter",
               {"lora_name": "x3", "lora_path": "{adapters}/rank32"}, 400, "lora_path",
               "rank 32 exceeds max_lora_rank 16"),
    BadRequest("adapter unknown target", "/v1/load_lora_adapter",
               {"lora_name": "x4", "lora_path": "{adapters}/embed"}, 400, "lora_path", "'embed_tokens'"),
    BadRequest("adapter shape mismatch", "/v1/load_lora_adapter",
               {"lora_name": "x5", "lora_path": "{adapters}/narrow"}, 400, "lora_path",
               "does not fit the base model"),
    BadRequest("adapter duplicate name", "/v1/load_lora_adapter",
               {"lora_name": "good", "lora_path": "{adapters}/good"}, 400, "lora_name", "already taken"),
    BadRequest("adapter name of the base model", "/v1/load_lora_adapter",
               {"lora_name": "{model}", "lora_path": "{adapters}/good"}, 400, "lora_name", "already taken"),
    BadRequest("adapter name of the embedding model", "/v1/load_lora_adapter",
               {"lora_name": "all-MiniLM-L6-v2", "lora_path": "{adapters}/good"}, 400, "lora_name",
               "already taken"),
    BadRequest("adapter load without a path", "/v1/load_lora_adapter", {"lora_name": "x6"}, 400,
               "lora_path", "field required"),
    BadRequest("unload unknown adapter", "/v1/unload_lora_adapter", {"lora_name": "never"}, 404,
               "lora_name", "no LoRA adapter named 'never'"),
    BadRequest("unknown adapter as model", "/v1/chat/completions", {"model": "never", **CHAT_OK}, 404,
               "model", "unknown model 'never'"),
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> str:
    """Adapter folders for the default model: one good, the rest each broken one way."""
    root = tmp_path_factory.mktemp("adapters")
    write_peft_adapter(str(root / "good"))
    write_peft_adapter(str(root / "rank32"), rank=32)
    write_peft_adapter(str(root / "embed"), target_modules=["q_proj", "embed_tokens"])
    write_peft_adapter(str(root / "narrow"), in_features=64)
    write_peft_adapter(str(root / "corrupt"))
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00not json")
    return str(root)


@pytest.fixture(scope="module")
def server(adapters: str) -> Iterator[ServerProcess]:
    with running_server("--max-model-len", str(MAX_MODEL_LEN),
                        "--max-body-bytes", str(MAX_BODY_BYTES), "--max-lora-rank", "16",
                        "--lora", f"good={adapters}/good") as process:
        yield process


@pytest.fixture(scope="module")
def model_id(server: ServerProcess) -> str:
    return requests.get(f"{server.base_url}/v1/models", timeout=REQUEST_TIMEOUT_S).json()["data"][0]["id"]


def _send(server: ServerProcess, case: BadRequest, model_id: str,
          adapters: str) -> requests.Response:
    url = server.base_url + case.path
    if case.method == "GET":
        return requests.get(url, timeout=REQUEST_TIMEOUT_S)
    if isinstance(case.body, bytes):
        data: Optional[bytes] = case.body
    else:
        data = (json.dumps(case.body).replace("{model}", model_id)
                .replace("{adapters}", adapters).encode())
    return requests.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=REQUEST_TIMEOUT_S)


def test_there_are_at_least_25_kinds() -> None:
    assert len({case.name for case in CASES}) >= 25


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_request_is_refused_with_a_named_field(server: ServerProcess, model_id: str,
                                                   adapters: str, case: BadRequest) -> None:
    response = _send(server, case, model_id, adapters)
    assert response.status_code == case.status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["param"] == case.field, error
    assert error["message"].startswith(case.field), error
    assert case.reason in error["message"], error


def test_server_still_serves_after_the_bad_requests(server: ServerProcess, model_id: str,
                                                     adapters: str) -> None:
    for case in CASES:  # all of them again, back to back
        assert _send(server, case, model_id, adapters).status_code == case.status
    response = requests.post(f"{server.base_url}/inference/completion", json={
        "model": model_id, "content": "The capital of France is", "max_tokens": 4}, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200
    assert response.json()["stop_reason"] == "max_tokens"
    assert "/inference/completion" in requests.get(f"{server.base_url}/metrics", timeout=REQUEST_TIMEOUT_S).text
