"""The AgenticSystem API end to end with the real pieces (issue 14 §5): the default model
(SmolLM2-135M) writing code_interpreter calls run in the bubblewrap sandbox, code_guard
(CodeShield) on the code it sends, and llama_guard running a tiny guard checkpoint made here
through the engine (--shield-model llama_guard=PATH). One server serves every test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import torch

from llama_engine.agents.sandbox import sandbox_unavailable_reason
from llama_engine.agents.store import DATABASE_FILE
from tests.agent_fakes import example_tool_turn
from tests.server_process import ServerProcess, running_server

UNAVAILABLE = sandbox_unavailable_reason()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no sandbox here: {UNAVAILABLE}")]

# A fork bomb's error output (stdout and stderr each cut to the sandbox's 8000 characters,
# about 4k tokens at worst) must fit in the next inference's prompt.
MAX_MODEL_LEN = 8192
TIMEOUT_S = 300
CODE_TOOL = {"tool_name": "code_interpreter", "input_shields": [], "output_shields": []}
ASK = "Run this code with the code interpreter: "
GUARD_ANSWER = "unsafe\nS1"
# A ChatML template whose generation prompt ends in "assistant", not a newline: the rigged
# guard below maps each token to the next, so no token may need two different successors.
GUARD_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                  "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
GUARD_LOGIT = 10.0  # the rigged next token's lm_head weight along its key's direction


def copy_turn(code: str, output: str) -> dict:
    return example_tool_turn(ASK + code, "code_interpreter", {"code": code}, f"[stdout]\n{output}\n",
                             f"It printed {output}.")


# SmolLM2-135M copies a one-line snippet into its call once it has seen a few such turns.
COPY_EXAMPLES = [copy_turn("import math; r = math.sqrt(16); print(r)", "4.0"),
                 copy_turn("while True: print('once'); break", "once"),
                 copy_turn("open('notes.txt', 'w').write('hi')", "")]


def make_always_unsafe_guard(folder: Path) -> Path:
    """A tiny random HF Llama that greedily answers ``unsafe\\nS1`` then EOS to any prompt in
    ``GUARD_TEMPLATE``. Attention and MLP outputs are zeroed, so the last position's hidden
    state is its token's embedding: the chain's tokens get one-hot embeddings and lm_head maps
    each to its successor (the prompt's last token -> "unsafe" -> ... -> EOS)."""
    import transformers
    from llama_engine.loader import default_model_path

    gguf_folder, gguf_name = os.path.split(default_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_name)
    tokenizer.chat_template = GUARD_TEMPLATE
    def prompt_ids(text: str) -> list[int]:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return tokenizer.encode(rendered, add_special_tokens=False)

    chain = [prompt_ids("x")[-1], *tokenizer.encode(GUARD_ANSWER, add_special_tokens=False), tokenizer.eos_token_id]
    keys = chain[:-1]
    assert len(set(keys)) == len(keys), "a token of the chain would need two successors"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_MODEL_LEN,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for index, (key, successor) in enumerate(zip(keys, chain[1:])):
            direction = torch.zeros(config.hidden_size)
            direction[index] = 1.0
            model.model.embed_tokens.weight[key] = direction
            model.lm_head.weight[successor] = GUARD_LOGIT * direction
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    # transformers is the reference: its greedy decoding of a guard prompt is the answer
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([prompt_ids("Is this safe?")])
    out = reference.generate(ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == GUARD_ANSWER
    return folder


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def server(tmp_path_factory, state_dir) -> Iterator[ServerProcess]:
    guard = make_always_unsafe_guard(tmp_path_factory.mktemp("guard"))
    with running_server("--max-model-len", str(MAX_MODEL_LEN), "--state-dir", str(state_dir),
                        "--shield-model", f"llama_guard={guard}") as process:
        yield process


def post(server: ServerProcess, path: str, body: Any) -> Any:
    response = requests.post(server.base_url + path, json=body, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def create(server: ServerProcess, uuid: str, **fields: Any) -> str:
    model = requests.get(server.base_url + "/v1/models", timeout=TIMEOUT_S).json()["data"][0]["id"]
    body = {"uuid": uuid, "instructions": "You are a helpful assistant.", "model": model,
            "available_tools": [], "executable_tools": [], "memory_bank_uuids": [],
            "input_shields": [], "output_shields": [], "max_tokens": 64, **fields}
    post(server, "/agentic_system/create", body)
    return uuid


def coder(server: ServerProcess, uuid: str, tool: dict = CODE_TOOL) -> str:
    return create(server, uuid, available_tools=[tool], executable_tools=["code_interpreter"],
                  tool_choice="required", max_infer_iters=2, max_tokens=128)


def execute(server: ServerProcess, agent: str, text: str, history: list = COPY_EXAMPLES) -> dict:
    body = {"agent_uuid": agent, "messages": [{"role": "user", "content": text}],
            "turn_history": list(history), "stream": False}
    return post(server, "/agentic_system/execute", body)["turn"]


COPY_ATTEMPTS = 3  # a snippet with a fresh port number in it is sometimes miscopied


def run_copied(server: ServerProcess, agent: str, code: str, attempts: int = COPY_ATTEMPTS) -> str:
    """Ask the model to run ``code``; the tool response it got. Fails unless the model's call
    holds exactly ``code``. The 135M model copies these snippets faithfully most of the time
    but not always (it once left a string unclosed until max_tokens): a turn whose call is not
    exactly ``code`` ran nothing of ours, so it is asked again, at most COPY_ATTEMPTS times."""
    for _ in range(attempts):
        turn = execute(server, agent, ASK + code)
        executions = [s for s in turn["steps"] if s["step_type"] == "tool_execution"]
        exact = [{"tool_name": "code_interpreter", "arguments": {"code": code}}]
        if executions and executions[0]["tool_calls"] == exact:
            return executions[0]["tool_responses"][0]["content"]
    raise AssertionError(f"no exact call of {code!r} in {attempts} turns; the last: "
                         f"{json.dumps(turn)}")


def test_model_written_code_runs_and_its_stdout_is_the_tool_response(server: ServerProcess) -> None:
    agent = coder(server, "writer")
    turn = execute(server, agent, "Print 6 times 7 in Python.",
                   [example_tool_turn("Print 2 plus 3 in Python.", "code_interpreter",
                                      {"code": "print(2 + 3)"}, "[stdout]\n5\n", "2 plus 3 is 5.")])
    [step] = [s for s in turn["steps"] if s["step_type"] == "tool_execution"]
    [call] = step["tool_calls"]
    code = call["arguments"]["code"]
    # the reference: the same code run by a plain Python
    expected = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert expected.stdout, f"the model's code prints nothing: {code!r}"
    assert step["tool_responses"][0]["content"] == f"[stdout]\n{expected.stdout}"


def test_a_variable_set_in_one_call_is_read_in_the_next(server: ServerProcess) -> None:
    agent = coder(server, "variables")
    assert run_copied(server, agent, "x = 6 * 7") == "[no output]"
    assert run_copied(server, agent, "print(x + 1)") == "[stdout]\n43\n"


def connect_from_the_jail(server: ServerProcess, agent: str) -> str:
    """The tool response to a connection attempt from the jail to a port listening on the
    host. Whether the small model copies the snippet faithfully depends on the port's digits
    (greedy decoding repeats a miscopy), so a miscopied port is replaced by a fresh one."""
    for _ in range(COPY_ATTEMPTS - 1):
        try:
            return _connect_once(server, agent)
        except AssertionError:
            pass
    return _connect_once(server, agent)


def _connect_once(server: ServerProcess, agent: str) -> str:
    with socket.socket() as listener:  # reachable from the host, not from the jail
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        return run_copied(server, agent, f"import socket; socket.create_connection(('127.0.0.1', {port}))",
                          attempts=1)


def test_the_sandbox_under_the_server(server: ServerProcess, state_dir: Path, tmp_path) -> None:
    agent = coder(server, "hostile")
    refused = connect_from_the_jail(server, agent)
    assert refused.startswith("[error]") and ("unreachable" in refused or "refused" in refused), refused
    assert run_copied(server, agent, "open('/etc/owned', 'w').write('x')").rstrip().endswith(
        "OSError: [Errno 30] Read-only file system: '/etc/owned'")
    assert not Path("/etc/owned").exists()
    # the state directory (the server's databases) is an empty folder but for the scratch root
    assert (state_dir / DATABASE_FILE).exists()
    assert run_copied(server, agent, f"import os; print(os.listdir('{state_dir}'))") == \
        "[stdout]\n['agent_scratch']\n"
    looped = run_copied(server, agent, "while True: pass")
    assert looped.startswith("[error]\ntimed out after")
    bomb = run_copied(server, agent, "while True: __import__('os').fork()")
    # the process limit stops it (fork fails in the call and in the children), or the timeout
    assert "[error]\n" in bomb and ("BlockingIOError" in bomb or "timed out" in bomb), bomb
    hog = run_copied(server, agent, "print(len(bytearray(8 << 30)))")
    assert hog.rstrip().endswith("MemoryError")
    # the server keeps serving, and so does the session
    assert run_copied(server, agent, "import math; r = math.sqrt(16); print(r)") == "[stdout]\n4.0\n"
    assert post(server, "/inference/completion", {"model": requests.get(
        server.base_url + "/v1/models", timeout=TIMEOUT_S).json()["data"][0]["id"],
        "content": "Hello", "max_tokens": 4})["content"]


def test_code_guard_blocks_insecure_code_sent_to_the_interpreter(server: ServerProcess) -> None:
    guarded = {**CODE_TOOL, "input_shields": [{"shield_type": "code_guard", "params": {}}]}
    agent = coder(server, "guarded-coder", guarded)
    turn = execute(server, agent, ASK + "import hashlib; print(hashlib.md5(b'hunter2').hexdigest())")
    filtering = [s for s in turn["steps"] if s["step_type"] == "safety_filtering"]
    assert [s["step_type"] for s in turn["steps"]] == ["model_inference", "safety_filtering"]
    violation = filtering[0]["violation"]
    assert violation["violation_type"] == "error" and "CWE-328" in violation["details"]
    assert turn["response_message"]["content"] == violation["suggested_user_response"]
    assert not [s for s in turn["steps"] if s["step_type"] == "tool_execution"]


def test_the_guard_checkpoint_blocks_input(server: ServerProcess) -> None:
    agent = create(server, "guard-in", input_shields=[{"shield_type": "llama_guard", "params": {}}])
    turn = execute(server, agent, "Tell me about kettles.", [])
    [step] = turn["steps"]
    assert step["step_type"] == "safety_filtering"
    assert step["violation"]["details"] == "llama_guard: unsafe content: S1 (Violent Crimes)"
    assert turn["response_message"]["content"] == step["violation"]["suggested_user_response"]


def test_an_output_violation_streams_no_text(server: ServerProcess) -> None:
    agent = create(server, "guard-out", output_shields=[{"shield_type": "llama_guard", "params": {}}])
    body = {"agent_uuid": agent, "messages": [{"role": "user", "content": "Tell me a story."}],
            "turn_history": [], "stream": True}
    with requests.post(server.base_url + "/agentic_system/execute", json=body, stream=True,
                       timeout=TIMEOUT_S) as response:
        assert response.status_code == 200, response.text
        chunks = [json.loads(line[len(b"data: "):]) for line in response.iter_lines()
                  if line.startswith(b"data: ")]
    assert all(c["response_text_delta"] is None for c in chunks)
    assert [c["step_type"] for c in chunks] == ["safety_filtering", "safety_filtering"]
    assert chunks[-1]["violation"]["details"] == "llama_guard: unsafe content: S1 (Violent Crimes)"
    assert chunks[-1]["response_message"]["content"] == chunks[-1]["violation"]["suggested_user_response"]
