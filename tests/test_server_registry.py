"""Several models in one server: ids, aliases, routing, and the 404 that lists them."""

from __future__ import annotations

from typing import Iterator

import pytest
import requests

from llama_engine.memory.embedding import EMBEDDING_MODEL_ID
from server.cli import split_model_argument
from tests.server_process import ServerProcess, running_server

TIMEOUT_S = 300
MAX_TOKENS = 6


def test_model_argument_with_and_without_id() -> None:
    assert split_model_argument("smol=/models/a.gguf") == ("smol", "/models/a.gguf")
    assert split_model_argument("/models/a=b.gguf") == (None, "/models/a=b.gguf")
    assert split_model_argument("a.gguf") == (None, "a.gguf")
    assert split_model_argument(None) == (None, None)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    from llama_engine.loader import default_model_path

    path = default_model_path()
    with running_server("--model", f"first={path}", "--model", f"second={path}",
                        "--alias", "llama3_8b_chat=second", "--max-model-len", "256") as process:
        yield process


@pytest.mark.slow
def test_two_models_are_listed_routed_and_named_in_404s(server: ServerProcess) -> None:
    models = requests.get(f"{server.base_url}/v1/models", timeout=TIMEOUT_S).json()["data"]
    assert [(m["id"], m["aliases"]) for m in models] == [("first", []), ("second", ["llama3_8b_chat"]),
                                                         (EMBEDDING_MODEL_ID, [])]
    texts = []
    for name in ("first", "second", "llama3_8b_chat"):
        response = requests.post(f"{server.base_url}/v1/completions", timeout=TIMEOUT_S, json={
            "model": name, "prompt": "The capital of France is", "max_tokens": MAX_TOKENS, "temperature": 0})
        assert response.status_code == 200 and response.json()["model"] == name
        texts.append(response.json()["choices"][0]["text"])
    assert len(set(texts)) == 1  # the same weights behind every name
    missing = requests.post(f"{server.base_url}/inference/completion", timeout=TIMEOUT_S,
                            json={"model": "llama3_70b", "content": "Hi"})
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == \
        "model: unknown model 'llama3_70b'; available: first, llama3_8b_chat, second"
    metrics = requests.get(f"{server.base_url}/metrics", timeout=TIMEOUT_S).text
    assert 'llama_engine_requests_running{model="first"}' in metrics
    assert 'llama_engine_requests_running{model="second"}' in metrics


def test_an_adapter_named_where_a_model_is_expected_is_a_400_naming_the_field() -> None:
    """SDG's policy and reward model, and reward scoring's model, are served models: an
    adapter's name there is refused by field, not an AttributeError (a 500)."""
    from types import SimpleNamespace

    from server.api.registry import ModelRegistry, ServedAdapter, ServedModel
    from server.api.errors import APIError
    registry = ModelRegistry()
    engine = SimpleNamespace(is_reward_model=False)
    base = ServedModel("base", engine, max_running=1, max_waiting=1)
    registry.add(base)
    registry.add_adapter(ServedAdapter("tuned", "/adapters/tuned", base))
    for resolve, field in ((registry.resolve_generator, "model"),
                           (registry.resolve_reward_model, "reward_model")):
        with pytest.raises(APIError) as raised:
            resolve("tuned", field)
        assert raised.value.param == field and raised.value.status == 400
        assert "LoRA adapter" in raised.value.message
