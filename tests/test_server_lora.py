"""LoRA adapters over HTTP: `--lora NAME=PATH`, /v1/load_lora_adapter and
/v1/unload_lora_adapter (vLLM's shapes), adapters in /v1/models with their parent, and the
request's `model` picking the adapter on the OpenAI and Llama Stack routes, with the tokens
the offline engine gives with the same adapter."""

from __future__ import annotations

import json
from typing import Iterator

import pytest
import requests

from tests.lora_cases import write_peft_adapter
from tests.server_process import ServerProcess, running_server

pytestmark = pytest.mark.slow

TIMEOUT_S = 300
PROMPT = "The capital of France is"
TOKENS = 6
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {"plain": write_peft_adapter(str(root / "plain"), 8, ALL_LINEAR, seed=1),
            "extra": write_peft_adapter(str(root / "extra"), 16, ("q_proj", "v_proj", "down_proj"),
                                        seed=2, use_rslora=True)}


@pytest.fixture(scope="module")
def server(folders) -> Iterator[ServerProcess]:
    with running_server("--lora", f"plain={folders['plain']}", "--max-loras", "2",
                        "--max-lora-rank", "16") as process:
        yield process


def _post(server: ServerProcess, path: str, body: dict) -> requests.Response:
    return requests.post(server.base_url + path, json=body, timeout=TIMEOUT_S)


def _openai_tokens(server: ServerProcess, model: str) -> str:
    response = _post(server, "/v1/completions", {"model": model, "prompt": PROMPT,
                                                  "max_tokens": TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return response.json()["choices"][0]["text"]


def _spec_text(server: ServerProcess, model: str) -> str:
    response = _post(server, "/inference/completion", {"model": model, "content": PROMPT,
                                                        "max_tokens": TOKENS})
    assert response.status_code == 200, response.text
    return response.json()["content"]


def test_adapters_serve_the_offline_engines_tokens(server, folders) -> None:
    from llama_engine import LLM, LoRARequest, SamplingParams
    base_id = requests.get(server.base_url + "/v1/models", timeout=TIMEOUT_S).json()["data"][0]["id"]
    loaded = _post(server, "/v1/load_lora_adapter", {"lora_name": "extra",
                                                      "lora_path": folders["extra"]})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["parent"] == base_id
    cards = {c["id"]: c for c in requests.get(server.base_url + "/v1/models",
                                              timeout=TIMEOUT_S).json()["data"]}
    assert cards["plain"]["parent"] == cards["extra"]["parent"] == base_id
    assert cards["extra"]["root"] == folders["extra"] and cards[base_id]["parent"] is None

    llm = LLM(enable_lora=True, max_loras=2, max_lora_rank=16)
    params = SamplingParams(temperature=0, max_tokens=TOKENS)
    expected = {name: llm.generate(PROMPT, params, lora_request=lora)[0].outputs[0].text
                for name, lora in [(base_id, None), ("plain", LoRARequest("plain", 1, folders["plain"])),
                                   ("extra", LoRARequest("extra", 2, folders["extra"]))]}
    assert len(set(expected.values())) == 3  # each adapter changes the text
    for model, text in expected.items():
        assert _openai_tokens(server, model) == text, model
        assert _spec_text(server, model) == text, model
    chat = _post(server, "/v1/chat/completions", {
        "model": "extra", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": TOKENS,
        "temperature": 0})
    expected_chat = llm.chat([{"role": "user", "content": "Hi"}], params,
                             lora_request=LoRARequest("extra", 2, folders["extra"]))
    assert chat.json()["choices"][0]["message"]["content"] == expected_chat[0].outputs[0].text


def test_unloading_an_adapter_in_use_lets_its_request_finish(server, folders) -> None:
    assert _post(server, "/v1/load_lora_adapter", {"lora_name": "brief",
                                                    "lora_path": folders["plain"]}).status_code == 200
    stream = requests.post(server.base_url + "/v1/completions", json={
        "model": "brief", "prompt": "Count to twenty: 1, 2, 3,", "max_tokens": 24,
        "temperature": 0, "stream": True}, stream=True, timeout=TIMEOUT_S)
    lines = stream.iter_lines()
    first = next(line for line in lines if line.startswith(b"data: "))
    assert json.loads(first[6:])["model"] == "brief"
    unloaded = _post(server, "/v1/unload_lora_adapter", {"lora_name": "brief"})
    assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloaded"
    refused = _post(server, "/v1/completions", {"model": "brief", "prompt": "Hi", "max_tokens": 1})
    assert refused.status_code == 404 and "'brief'" in refused.json()["error"]["message"]
    events = [line[6:] for line in lines if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]]
    assert finishes[-1] in ("length", "stop") and "error" not in events[-2].decode()
    again = _post(server, "/v1/load_lora_adapter", {"lora_name": "brief", "lora_path": folders["plain"]})
    assert again.status_code == 200, again.text  # the name is free once its request finished
