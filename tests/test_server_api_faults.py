"""Issue 11's faults, each input with its right value, and the whole kinds behind them: a
stream assembled equals the whole response, echo returns the prompt as sent, every accepted
OpenAI field does what OpenAI says and every unsupported one is refused by name.

References: the engine offline (`LLM.generate`, itself checked against transformers), the
prompt as sent, transformers' GPT-2 byte alphabet for token bytes, OpenAI's documented
semantics."""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
import requests

from tests.server_process import ServerProcess, running_server

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
TIMEOUT_S = 300
MODEL = "m"  # an alias for the one loaded model


@pytest.fixture(scope="module")
def reference() -> Any:
    from llama_engine import LLM

    return LLM(None, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def server(reference: Any) -> Iterator[ServerProcess]:
    with running_server("--max-model-len", str(MAX_MODEL_LEN),
                        "--alias", f"{MODEL}={reference.engine.model_id}") as process:
        yield process


def post(server: ServerProcess, path: str, body: dict[str, Any], status: int = 200) -> Any:
    response = requests.post(server.base_url + path, json={"model": MODEL, **body}, timeout=TIMEOUT_S)
    assert response.status_code == status, response.text
    return response.json()


def stream(server: ServerProcess, path: str, body: dict[str, Any]) -> list[Any]:
    with requests.post(server.base_url + path, json={"model": MODEL, **body, "stream": True},
                       stream=True, timeout=TIMEOUT_S) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        events = [line[len(b"data: "):].decode("utf-8") for line in response.iter_lines()
                  if line.startswith(b"data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def offline(reference: Any, prompt: Any, **params: Any) -> Any:
    from llama_engine import SamplingParams

    return reference.generate(prompt, SamplingParams(**params))[0]


def gpt2_token_bytes(reference: Any, token_id: int) -> bytes:
    """A token's bytes through transformers' own GPT-2 byte alphabet (not our tokenizer)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    return bytes(byte_of[c] for c in reference.get_tokenizer().id_to_token(token_id))


# ---- section 1: each fault's input ------------------------------------------------------------


def test_fault1_max_tokens_zero_generates_nothing(server: ServerProcess) -> None:
    body = post(server, "/v1/completions", {"prompt": "1, 2, 3, 4,", "max_tokens": 0, "temperature": 0,
                                            "stop": [" 9"]})
    assert [(c["text"], c["finish_reason"]) for c in body["choices"]] == [("", "length")]
    assert body["usage"]["completion_tokens"] == 0


def test_fault1_max_tokens_zero_with_echo_scores_the_prompt(server: ServerProcess, reference: Any) -> None:
    prompt = "1, 2, 3, 4,"
    body = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0})
    choice = body["choices"][0]
    assert choice["text"] == prompt
    ids = reference.get_tokenizer().encode(prompt)
    expected = offline(reference, ids, max_tokens=0, prompt_logprobs=0).prompt_logprobs
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [lp[t] for t, lp in zip(ids[1:], expected[1:])], abs=1e-4)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_fault2_echo_returns_the_prompt_tokens_logprobs(server: ServerProcess, reference: Any) -> None:
    prompt = "Your answer: Yes"
    body = post(server, "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1,
                                            "temperature": 0})
    ids = reference.get_tokenizer().encode(prompt)
    expected = offline(reference, ids, max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1)
    generated = expected.outputs[0]
    logprobs = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"] == prompt + generated.text
    assert logprobs["tokens"] == [reference.get_tokenizer().decode([t]) for t in ids + generated.token_ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    want = [lp[t] for t, lp in zip(ids[1:] + generated.token_ids, expected.prompt_logprobs[1:] + generated.logprobs)]
    assert logprobs["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"][1:])  # 1 best, plus the chosen
    assert all(token in top for token, top in zip(logprobs["tokens"][1:], logprobs["top_logprobs"][1:]))
    assert logprobs["text_offset"][:2] == [0, len(logprobs["tokens"][0])]
    assert logprobs["text_offset"][len(ids)] == len(prompt)


def test_fault3_one_finish_reason_chunk_per_choice(server: ServerProcess) -> None:
    events = stream(server, "/v1/completions", {"prompt": "Q: What is 2+2?\nA:", "n": 2, "max_tokens": 30,
                                                "temperature": 1.0, "seed": 4, "stop": ["\n"]})
    assert events[-1] == "[DONE]"
    choices = [c for e in events[:-1] for c in e["choices"]]
    for index in (0, 1):
        mine = [c for c in choices if c["index"] == index]
        assert [c["finish_reason"] is not None for c in mine].count(True) == 1
        assert mine[-1]["finish_reason"] is not None  # nothing after it


def test_fault4_echo_is_sent_once_while_a_stop_string_holds_text_back(server: ServerProcess) -> None:
    prompt = "Here is the English alphabet: ABC"
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "echo": True, "stop": ["DEFGHIJ"]}
    events = stream(server, "/v1/completions", body)
    texts = [c["text"] for e in events[:-1] for c in e["choices"]]
    assert sum(prompt in text for text in texts) == 1
    assert "".join(texts) == post(server, "/v1/completions", body)["choices"][0]["text"]


def test_fault5_partial_utf8_tokens_report_their_own_bytes(server: ServerProcess, reference: Any) -> None:
    body = post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Translate to Japanese: good morning"}], "max_tokens": 2,
        "temperature": 0, "logprobs": True, "top_logprobs": 2})
    choice = body["choices"][0]
    prompt_ids = reference.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Translate to Japanese: good morning"}])
    token_ids = offline(reference, prompt_ids, max_tokens=2, temperature=0).outputs[0].token_ids
    entries = choice["logprobs"]["content"]
    expected_bytes = [gpt2_token_bytes(reference, t) for t in token_ids]
    assert [bytes(e["bytes"]) for e in entries] == expected_bytes
    assert any(b"\xef\xbf\xbd" not in raw and not _valid_utf8(raw) for raw in expected_bytes)  # the fault's case
    for entry, raw in zip(entries, expected_bytes):
        assert entry["token"] == (raw.decode() if _valid_utf8(raw)
                                  else "bytes:" + "".join(f"\\x{b:02x}" for b in raw))
        assert entry["top_logprobs"][0]["bytes"] == entry["bytes"]  # greedy: the best is the chosen
    # the bytes rebuild the text (a character cut off at the end is the text's to keep or not)
    assert b"".join(expected_bytes).startswith(choice["message"]["content"].encode())


def _valid_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_fault7_max_tokens_beyond_the_context_is_a_400(server: ServerProcess, reference: Any) -> None:
    prompt = "The capital of France is"
    prompt_tokens = len(reference.get_tokenizer().encode(prompt))
    asked = MAX_MODEL_LEN - prompt_tokens + 1
    error = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": asked}, status=400)["error"]
    assert error["param"] == "max_tokens"
    for number in (MAX_MODEL_LEN, prompt_tokens, asked):
        assert str(number) in error["message"]
    # exactly what is left fits; no max_tokens still means "up to the context"
    assert post(server, "/v1/completions", {"prompt": prompt, "max_tokens": asked - 1, "temperature": 0,
                                            "stop": ["."]})["choices"]
    post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0})


# ---- section 3: whole kinds -------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "Name three colors."}]}
EQUIVALENCE_CASES = {
    "completion n=2 echo stop logprobs": ("/v1/completions", {
        "prompt": "Here is the English alphabet: ABC", "n": 2, "echo": True, "logprobs": 2, "max_tokens": 12,
        "temperature": 1.0, "seed": 7, "stop": ["H", "DEFGHIJ"]}),
    "completion two prompts, token ids": ("/v1/completions", {
        "prompt": [[504, 3575, 282, 4649, 314], [48, 42, 1812, 314, 216, 34, 32, 34, 47, 198, 49, 42]], "n": 2, "max_tokens": 10,
        "temperature": 1.0, "seed": 3, "stop": ["\n"], "logprobs": 1}),
    "completion unicode greedy": ("/v1/completions", {
        "prompt": "Translate to Japanese: good morning ->", "max_tokens": 6, "temperature": 0, "logprobs": 3,
        "echo": True}),
    "chat n=3 stop logprobs": ("/v1/chat/completions", {
        **CHAT, "n": 3, "max_tokens": 16, "temperature": 1.0, "seed": 11, "stop": [","], "logprobs": True,
        "top_logprobs": 2}),
    "chat japanese greedy": ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Translate to Japanese: good morning"}], "max_tokens": 6,
        "temperature": 0, "logprobs": True, "top_logprobs": 1}),
}


LOGPROB_TOL = 1e-4  # two runs of one request may batch (and so round) differently


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Equal, floats within LOGPROB_TOL, with the path to the first difference."""
    if isinstance(want, float) and isinstance(got, (int, float)):
        assert abs(got - want) <= LOGPROB_TOL, where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def assemble_completion(events: list[Any]) -> dict[int, dict[str, Any]]:
    choices: dict[int, dict[str, Any]] = {}
    for event in events:
        for c in event["choices"]:
            whole = choices.setdefault(c["index"], {"text": "", "finish_reasons": [], "logprobs": None})
            whole["text"] += c["text"]
            if c["finish_reason"] is not None:
                whole["finish_reasons"].append(c["finish_reason"])
            if c["logprobs"] is not None:
                lp = whole["logprobs"] = whole["logprobs"] or {key: [] for key in c["logprobs"]}
                for key, values in c["logprobs"].items():
                    lp[key] += values
    return choices


def assemble_chat(events: list[Any]) -> dict[int, dict[str, Any]]:
    choices: dict[int, dict[str, Any]] = {}
    for event in events:
        for c in event["choices"]:
            whole = choices.setdefault(c["index"], {"content": "", "finish_reasons": [], "logprobs": None})
            whole["content"] += c["delta"].get("content") or ""
            if c["finish_reason"] is not None:
                whole["finish_reasons"].append(c["finish_reason"])
            if c["logprobs"] is not None:
                whole["logprobs"] = (whole["logprobs"] or []) + c["logprobs"]["content"]
    return choices


@pytest.mark.parametrize("case", list(EQUIVALENCE_CASES))
def test_openai_stream_assembled_equals_the_response(server: ServerProcess, case: str) -> None:
    path, body = EQUIVALENCE_CASES[case]
    whole = post(server, path, body)
    events = stream(server, path, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    assert events[-2]["usage"] == whole["usage"]
    chat = path == "/v1/chat/completions"
    assembled = (assemble_chat if chat else assemble_completion)(events[:-2])
    assert sorted(assembled) == [c["index"] for c in whole["choices"]]
    for choice in whole["choices"]:
        got = assembled[choice["index"]]
        assert got["finish_reasons"] == [choice["finish_reason"]]
        if chat:
            assert got["content"] == choice["message"]["content"]
            assert_same(got["logprobs"], choice["logprobs"]["content"], "logprobs")
        else:
            assert got["text"] == choice["text"]
            assert_same(got["logprobs"], choice["logprobs"], "logprobs")


SPEC_CASES = {
    "completion": ("/inference/completion", {"content": "The capital of France is", "max_tokens": 12,
                                             "logprobs": True}),
    "completion sampled": ("/inference/completion", {
        "content": "Once upon a time", "max_tokens": 12, "logprobs": True,
        "sampling_params": {"strategy": "top_k", "top_k": 1, "temperature": 0.7}}),
    "chat": ("/inference/chat_completion", {"dialog": {"message": {"role": "user", "content": "Name a color."}},
                                           "max_tokens": 12, "logprobs": True}),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_spec_stream_assembled_equals_the_response(server: ServerProcess, case: str) -> None:
    path, body = SPEC_CASES[case]
    whole = post(server, path, body)
    events = stream(server, path, body)
    assert "".join(e["text_delta"] for e in events) == whole["content"]
    assert [e["stop_reason"] for e in events if e["stop_reason"] is not None] == [whole["stop_reason"]]
    assert events[-1]["stop_reason"] == whole["stop_reason"]
    logprobs = [e["logprobs"] for e in events if e.get("logprobs")]
    assert_same({key: [v for lp in logprobs for v in lp[key]] for key in whole["logprobs"]}, whole["logprobs"])


ECHO_PROMPTS = ["  leading and trailing spaces  ", "tabs\tand\r\nwindows newlines\n\n", "おはよう 😀 ok",
                "<|im_start|>user\nspecial tokens as text<|im_end|>", "a" * 3 + " " * 5 + "é" + "\u0301"]


@pytest.mark.parametrize("prompt", ECHO_PROMPTS)
def test_echo_returns_the_prompt_exactly_as_sent(server: ServerProcess, prompt: str) -> None:
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True}
    whole = post(server, "/v1/completions", body)["choices"][0]["text"]
    assert whole.startswith(prompt)
    streamed = "".join(c["text"] for e in stream(server, "/v1/completions", body)[:-1] for c in e["choices"])
    assert streamed == whole
    assert post(server, "/v1/completions", {**body, "max_tokens": 0})["choices"][0]["text"] == prompt


def test_echo_of_token_ids_is_their_text(server: ServerProcess, reference: Any) -> None:
    ids = reference.get_tokenizer().encode("<|im_start|>Hello there")
    text = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True})["choices"][0]["text"]
    assert text == "<|im_start|>Hello there"


# Each accepted OpenAI field, a request using it, and the offline engine's output for the same
# setting, as OpenAI defines the field.
COMPLETION_PROMPT = "The best thing about living in a big city is"


def _greedy_text(reference: Any, **params: Any) -> str:
    ids = reference.get_tokenizer().encode(COMPLETION_PROMPT)
    return offline(reference, ids, **{"temperature": 0, "max_tokens": 12, **params}).outputs[0].text


def _choices(body: Any) -> list[str]:
    return [c["text"] for c in body["choices"]]


def test_accepted_completion_fields_act_as_openai_says(server: ServerProcess, reference: Any) -> None:
    base = {"prompt": COMPLETION_PROMPT, "max_tokens": 12, "temperature": 0}
    greedy = _greedy_text(reference)
    assert _choices(post(server, "/v1/completions", base)) == [greedy]
    # max_tokens: at most that many tokens, finish "length"
    body = post(server, "/v1/completions", {**base, "max_tokens": 3})
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"
    # n: that many choices
    assert _choices(post(server, "/v1/completions", {**base, "n": 3})) == [greedy] * 3
    # stop: the text ends before the stop sequence, finish "stop"
    stop = greedy[5:8]
    body = post(server, "/v1/completions", {**base, "stop": stop})
    assert body["choices"][0]["text"] == greedy[:greedy.index(stop)] and body["choices"][0]["finish_reason"] == "stop"
    # temperature / top_p / seed: sampling, reproducible with a seed
    sampled = {"temperature": 1.3, "top_p": 0.8, "seed": 5}
    expected = _greedy_text(reference, **sampled)
    assert _choices(post(server, "/v1/completions", {**base, **sampled})) == [expected]
    # presence / frequency penalties, and vLLM's top_k, min_p, repetition_penalty
    for extra in ({"presence_penalty": 1.5}, {"frequency_penalty": 2.0}, {"repetition_penalty": 1.5},
                  {"top_k": 3, "temperature": 1.0, "seed": 9}, {"min_p": 0.2, "temperature": 1.0, "seed": 9}):
        assert _choices(post(server, "/v1/completions", {**base, **extra})) == [_greedy_text(reference, **extra)], extra
    assert _greedy_text(reference, repetition_penalty=1.5) != greedy  # a penalty did something
    # logprobs: that many alternatives per token
    body = post(server, "/v1/completions", {**base, "logprobs": 2})
    assert len(body["choices"][0]["logprobs"]["tokens"]) == 12
    assert all(2 <= len(top) <= 3 for top in body["choices"][0]["logprobs"]["top_logprobs"])
    # echo: the prompt first
    assert _choices(post(server, "/v1/completions", {**base, "echo": True})) == [COMPLETION_PROMPT + greedy]
    # user: accepted, changes nothing
    assert _choices(post(server, "/v1/completions", {**base, "user": "someone"})) == [greedy]


def test_accepted_chat_fields_act_as_openai_says(server: ServerProcess, reference: Any) -> None:
    base = {**CHAT, "temperature": 0, "max_tokens": 10}
    prompt_ids = reference.get_tokenizer().apply_chat_template(CHAT["messages"])
    greedy = offline(reference, prompt_ids, temperature=0, max_tokens=10).outputs[0].text
    assert post(server, "/v1/chat/completions", base)["choices"][0]["message"]["content"] == greedy
    # max_completion_tokens wins over max_tokens
    body = post(server, "/v1/chat/completions", {**base, "max_completion_tokens": 2})
    assert body["usage"]["completion_tokens"] == 2 and body["choices"][0]["finish_reason"] == "length"
    # logprobs without top_logprobs: the chosen token only, no alternatives
    entries = post(server, "/v1/chat/completions", {**base, "logprobs": True})["choices"][0]["logprobs"]["content"]
    assert len(entries) == 10 and all(e["top_logprobs"] == [] for e in entries)
    entries = post(server, "/v1/chat/completions",
                   {**base, "logprobs": True, "top_logprobs": 3})["choices"][0]["logprobs"]["content"]
    assert all(len(e["top_logprobs"]) == 3 for e in entries)
    # the most likely alternative is the chosen token under greedy decoding
    assert all(e["top_logprobs"][0]["token"] == e["token"] for e in entries)
    body = post(server, "/v1/chat/completions", {**base, "top_k": 1, "temperature": 1.5, "seed": 1,
                                                 "repetition_penalty": 1.0, "min_p": 0.0})
    assert body["choices"][0]["message"]["content"] == greedy  # top_k 1 is greedy


UNSUPPORTED = {
    "/v1/completions": {"best_of": 2, "suffix": "!", "stream_option": {}},
    "/v1/chat/completions": {"functions": [], "function_call": "auto", "audio": {}, "modalities": ["text"],
                             "prediction": {}, "store": True, "metadata": {}, "service_tier": "auto",
                             "reasoning_effort": "low", "web_search_options": {}},
    "/inference/completion": {"temperature": 0.5, "stop": ["x"]},
}


@pytest.mark.parametrize("path, field", [(p, f) for p, fields in UNSUPPORTED.items() for f in fields])
def test_unsupported_fields_are_refused_by_name(server: ServerProcess, path: str, field: str) -> None:
    base = ({"prompt": "Hi"} if path == "/v1/completions" else {"content": "Hi"} if path.startswith("/inference")
            else CHAT)
    error = post(server, path, {**base, field: UNSUPPORTED[path][field]}, status=400)["error"]
    assert error["param"] == field and error["message"] == f"{field}: unknown field"
