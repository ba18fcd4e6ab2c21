"""Operations: auth, /metrics, /openapi.json, the bounded queue (503), client disconnects,
the access log, and draining on SIGTERM, all against a real server process."""

from __future__ import annotations

import json
import re
import signal
import time
from typing import Iterator

import pytest
import requests

from tests.server_process import ServerProcess, running_server

pytestmark = pytest.mark.slow

API_KEY = "test-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 512
LONG_GENERATION = 400  # long enough to still be running while the test does other things
TIMEOUT_S = 300
POLL_INTERVAL_S = 0.2
MAX_POLLS = 600
SAMPLE = re.compile(r"^(?P<name>[a-z_:]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    # One running slot and one waiting slot: a third concurrent request must be refused.
    with running_server("--api-key", API_KEY, "--max-running", "1", "--max-waiting", "1",
                        "--max-model-len", str(MAX_MODEL_LEN)) as process:
        yield process


@pytest.fixture(scope="module")
def model_id(server: ServerProcess) -> str:
    return requests.get(f"{server.base_url}/v1/models", headers=AUTH, timeout=TIMEOUT_S).json()["data"][0]["id"]


def metrics(server: ServerProcess) -> dict[tuple[str, frozenset], float]:
    text = requests.get(f"{server.base_url}/metrics", headers=AUTH, timeout=TIMEOUT_S).text
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        samples[(match["name"], labels)] = float(match["value"])
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_until_idle(server: ServerProcess, model_id: str) -> dict:
    """Poll until nothing is in flight (bounded); returns the last metrics."""
    for _ in range(MAX_POLLS):
        samples = metrics(server)
        if (metric(samples, "llama_engine_requests_in_flight", model=model_id) == 0
                and metric(samples, "llama_engine_requests_running", model=model_id) == 0):
            return samples
        time.sleep(POLL_INTERVAL_S)
    raise AssertionError("the server never went idle")


def open_stream(server: ServerProcess, model_id: str, max_tokens: int = LONG_GENERATION) -> requests.Response:
    response = requests.post(f"{server.base_url}/v1/chat/completions", headers=AUTH, stream=True, timeout=TIMEOUT_S,
                             json={"model": model_id, "messages": [{"role": "user", "content": "Tell me a story."}],
                                   "max_tokens": max_tokens, "temperature": 0, "stream": True})
    assert response.status_code == 200, response.text
    return response


def data_lines(response: requests.Response) -> Iterator[str]:
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            yield line[len("data: "):]


# ---- auth --------------------------------------------------------------------------------


def test_health_needs_no_key_and_everything_else_does(server: ServerProcess, model_id: str) -> None:
    assert requests.get(f"{server.base_url}/health", timeout=TIMEOUT_S).status_code == 200
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                         ("POST", "/inference/completion"), ("POST", "/v1/chat/completions")]:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}]:
            response = requests.request(method, server.base_url + path, headers=headers, json={}, timeout=TIMEOUT_S)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["param"] == "Authorization"
    body = {"model": model_id, "content": "Hi", "max_tokens": 2}
    assert requests.post(f"{server.base_url}/inference/completion", headers=AUTH, json=body,
                         timeout=TIMEOUT_S).status_code == 200


# ---- metrics -----------------------------------------------------------------------------


def test_metrics_count_tokens_requests_and_latency(server: ServerProcess, model_id: str) -> None:
    wait_until_idle(server, model_id)
    before = metrics(server)
    response = requests.post(f"{server.base_url}/v1/completions", headers=AUTH, timeout=TIMEOUT_S, json={
        "model": model_id, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0})
    usage = response.json()["usage"]
    after = wait_until_idle(server, model_id)

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("llama_engine_prompt_tokens_total", model=model_id) == usage["prompt_tokens"]
    assert grew("llama_engine_generation_tokens_total", model=model_id) == usage["completion_tokens"]
    assert grew("llama_engine_http_requests_total", route="/v1/completions", method="POST", status="200") == 1
    assert grew("llama_engine_time_to_first_token_seconds_count", model=model_id) == 1
    assert grew("llama_engine_time_per_output_token_seconds_count", model=model_id) == 1
    assert metric(after, "llama_engine_time_to_first_token_seconds_bucket", model=model_id, le="+Inf") == \
        metric(after, "llama_engine_time_to_first_token_seconds_count", model=model_id)
    assert metric(after, "llama_engine_kv_cache_usage_ratio", model=model_id) == 0.0
    assert 0.0 <= metric(after, "llama_engine_prefix_cache_hit_rate", model=model_id) <= 1.0
    assert ("llama_engine_requests_waiting", frozenset({("model", model_id)})) in after


# ---- OpenAPI -----------------------------------------------------------------------------


def test_openapi_document_covers_every_route_and_resolves(server: ServerProcess) -> None:
    document = requests.get(f"{server.base_url}/openapi.json", headers=AUTH, timeout=TIMEOUT_S).json()
    assert document["openapi"] == "3.1.0"
    expected = {"/inference/completion": "post", "/inference/chat_completion": "post",
                "/inference/batch_completion": "post", "/inference/batch_chat_completion": "post",
                "/v1/completions": "post", "/v1/chat/completions": "post", "/v1/models": "get",
                "/health": "get", "/metrics": "get",
                "/datasets/create": "post", "/datasets/get": "get", "/datasets/delete": "delete",
                "/post_training/supervised_fine_tune/": "post",
                "/post_training/preference_optimize/": "post", "/post_training/job/status": "get",
                "/post_training/job/logs": "get", "/post_training/job/artifacts": "get",
                "/post_training/job/cancel": "post",
                "/memory_banks/create": "post", "/memory_banks/get": "get",
                "/memory_banks/drop": "delete", "/memory_bank/insert": "post",
                "/memory_bank/update": "post", "/memory_bank/get": "post",
                "/memory_bank/delete": "post", "/memory_bank/query": "post",
                "/v1/embeddings": "post", "/agentic_system/create": "post",
                "/agentic_system/execute": "post", "/agentic_system/delete": "delete",
                "/reward_scoring/score": "post", "/synthetic_data_generation/generate": "post",
                "/v1/load_lora_adapter": "post", "/v1/unload_lora_adapter": "post"}
    assert {path: next(iter(ops)) for path, ops in document["paths"].items()} == expected
    schemas = document["components"]["schemas"]
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(document))
    assert refs and all(ref in schemas for ref in refs)
    assert schemas["CompletionRequest"]["additionalProperties"] is False
    assert schemas["SamplingParams"]["properties"]["strategy"]["default"] == "greedy"


def test_openapi_document_passes_a_3_1_validator(server: ServerProcess) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    document = requests.get(f"{server.base_url}/openapi.json", headers=AUTH, timeout=TIMEOUT_S).json()
    validator.validate(document)


# ---- bounded queue, disconnects ----------------------------------------------------------


def test_past_the_queue_503_with_retry_after_and_running_requests_unharmed(server: ServerProcess,
                                                                          model_id: str) -> None:
    wait_until_idle(server, model_id)
    running = open_stream(server, model_id, max_tokens=60)
    running_lines = data_lines(running)
    assert json.loads(next(running_lines))["choices"][0]["delta"]["role"] == "assistant"
    waiting = open_stream(server, model_id)  # takes the one waiting slot, and keeps it a while
    refused = requests.post(f"{server.base_url}/inference/completion", headers=AUTH, timeout=TIMEOUT_S,
                            json={"model": model_id, "content": "Hi", "max_tokens": 2})
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert "at capacity" in refused.json()["error"]["message"]
    rest = list(running_lines)
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    waiting.close()
    wait_until_idle(server, model_id)


def test_client_disconnect_aborts_the_request_and_frees_kv(server: ServerProcess, model_id: str) -> None:
    wait_until_idle(server, model_id)
    before = metrics(server)
    response = open_stream(server, model_id)
    lines = data_lines(response)
    next(lines), next(lines)  # the role chunk, then the first token: it is running
    response.close()  # the client goes away mid-stream
    after = wait_until_idle(server, model_id)
    assert metric(after, "llama_engine_kv_cache_usage_ratio", model=model_id) == 0.0
    generated = (metric(after, "llama_engine_generation_tokens_total", model=model_id)
                 - metric(before, "llama_engine_generation_tokens_total", model=model_id))
    assert 1 <= generated < LONG_GENERATION  # stopped early, not run to the end


def test_access_log_has_one_structured_line_per_request(server: ServerProcess) -> None:
    marker = f"/health?probe={time.monotonic_ns()}"
    requests.get(server.base_url + marker, timeout=TIMEOUT_S)
    entries = []
    for _ in range(MAX_POLLS):  # the log is written by another process: poll, bounded
        entries = [json.loads(line.split("server.access INFO ", 1)[1]) for line in server.log().splitlines()
                   if "server.access INFO " in line]
        if any(e["path"] == "/health" for e in entries):
            break
        time.sleep(POLL_INTERVAL_S)
    health = [e for e in entries if e["path"] == "/health"]
    assert health and {"method", "status", "duration_ms", "route", "remote"} <= set(health[-1])
    assert health[-1]["status"] == 200


# ---- SIGTERM ----------------------------------------------------------------------------


def test_sigterm_drains_in_flight_requests() -> None:
    with running_server("--max-model-len", str(MAX_MODEL_LEN)) as draining:
        model = requests.get(f"{draining.base_url}/v1/models", timeout=TIMEOUT_S).json()["data"][0]["id"]
        response = requests.post(f"{draining.base_url}/inference/completion", stream=True, timeout=TIMEOUT_S,
                                 json={"model": model, "content": "Once upon a time", "max_tokens": 40,
                                       "stream": True})
        lines = data_lines(response)
        first = json.loads(next(lines))
        draining.process.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in lines]
        assert [first, *rest][-1]["stop_reason"] == "max_tokens"
        assert len([first, *rest]) > 1
        assert draining.process.wait(timeout=TIMEOUT_S) == 0
