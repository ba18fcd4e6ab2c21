"""The llama-engine command, run as a user runs it."""
from __future__ import annotations

import subprocess
import sys

CLI = [sys.executable, "-m", "llama_engine.cli"]
TIMEOUT_S = 300


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def test_chat_answers_capital_of_france():
    res = run_cli("chat", "--max-tokens", "40", stdin="What is the capital of France?\n")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_generate_greedy_matches_offline_api(default_llm):
    from llama_engine import SamplingParams
    prompt = "The three primary colors are"
    expected = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))
    res = run_cli("generate", prompt, "--max-tokens", "12")
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip("\n") == expected[0].outputs[0].text


def test_missing_model_is_one_clear_line():
    res = run_cli("generate", "hi", "--model", "/no/such/model.gguf")
    assert res.returncode == 2
    assert "model path does not exist: /no/such/model.gguf" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_max_tokens_is_one_clear_line():
    res = run_cli("generate", "hi", "--max-tokens", "-1")  # 0 is valid: it scores the prompt
    assert res.returncode == 2
    assert "max_tokens: must be an integer >= 0" in res.stderr
    assert "Traceback" not in res.stderr
