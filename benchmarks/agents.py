"""Agent turn benchmark: where a turn's time goes, step by step, on a real server.

    python benchmarks/agents.py --turns 5                  # spawns a server on the default model
    python benchmarks/agents.py --url http://127.0.0.1:8321 --model llama3_8b_chat

The agent has a memory bank (a few invented facts) and the built-in ``math`` tool, executable,
under ``tool_choice: required`` with ``max_infer_iters`` 2, so each turn runs every kind of
step: memory_retrieval, model_inference (a forced math call), tool_execution, model_inference
(the answer). For each step type it records the client-side time from ``step_start`` to
``step_end`` (streamed), and the server's own ``llama_engine_agent_step_seconds`` histogram
(its sum and count before and after, from ``/metrics``). The agent layer's overhead is the
turn's wall time over the time its inference steps took (1.0: no overhead). Then the code
interpreter's cold and warm call latency (``benchmarks/code_interpreter.py``, run here in
process). Results go to benchmarks/results/agents-<date>.{md,json}.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.code_interpreter import add_call_arguments, bench_code_interpreter, table_lines  # noqa: E402
from benchmarks.throughput import cpu_model  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LOOPBACK = "127.0.0.1"
TIMEOUT_S = 600
HEALTH_POLL_S = 0.25
MAX_TOKENS = 32
STEP_METRIC = "llama_engine_agent_step_seconds"
FACTS = ["The Zorblax lab keeps 42 copper kettles on its roof.",
         "Velbrook rowing club's mascot is a green heron named Pimbly.",
         "Captain Orla Vantree mapped the island of Skerrow in 1742."]
QUESTION = "What is 42 times 3?"
# One earlier exchange shows SmolLM2-135M how a math call looks (zero-shot it writes prose
# into the expression).
EXAMPLE_TURN = {
    "user_messages": [{"role": "user", "content": "What is 6 times 7?"}],
    "steps": [{"step_type": "model_inference", "uuid": "example-inference", "text": ""},
              {"step_type": "tool_execution", "uuid": "example-tool",
               "tool_calls": [{"tool_name": "math", "arguments": {"expression": "6*7"}}],
               "tool_responses": [{"tool_name": "math", "content": "42"}]}],
    "response_message": {"role": "assistant", "content": "6 times 7 is 42."}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="a running server (default: spawn one on the default model)")
    p.add_argument("--model", default=None, help="model id or alias (default: the server's first)")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    add_call_arguments(p)


def request(url: str, body: Any = None, method: str = "POST") -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as response:
        return response.read()


@contextlib.contextmanager
def spawned_server() -> Iterator[str]:
    """``python -m server.cli`` on a free loopback port with a fresh state directory."""
    from benchmarks.startup import free_port
    port = free_port()
    state = tempfile.mkdtemp(prefix="agents-bench-")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "--host", LOOPBACK, "--port", str(port),
                                "--max-model-len", "1024", "--state-dir", state],
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(urllib.error.URLError, ConnectionError, OSError):
                request(url + "/health", method="GET")
                break
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            time.sleep(HEALTH_POLL_S)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT_S)


def step_histogram(url: str) -> dict[str, tuple[float, int]]:
    """step_type -> (sum of seconds, count) from the server's /metrics."""
    found: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for line in request(url + "/metrics", method="GET").decode().splitlines():
        for suffix, position in (("_sum{", 0), ("_count{", 1)):
            if line.startswith(STEP_METRIC + suffix):
                step_type = line.split('step_type="', 1)[1].split('"', 1)[0]
                found[step_type][position] = float(line.rsplit(" ", 1)[1])
    return {k: (v[0], int(v[1])) for k, v in found.items()}


def streamed_turn(url: str, agent: str) -> tuple[float, dict[str, list[float]], str]:
    """One streamed turn: its wall time, each step's start-to-end seconds by step type, and
    the response's text."""
    body = json.dumps({"agent_uuid": agent, "messages": [{"role": "user", "content": QUESTION}],
                       "turn_history": [EXAMPLE_TURN], "stream": True}).encode()
    req = urllib.request.Request(url + "/agentic_system/execute", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    started_at: dict[str, float] = {}
    steps: dict[str, list[float]] = defaultdict(list)
    answer = ""
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as response:
        for raw in response:
            if not raw.startswith(b"data: "):
                continue
            chunk, now = json.loads(raw[len(b"data: "):]), time.perf_counter()
            if chunk.get("error"):
                raise RuntimeError(chunk["error"])
            if chunk["event_type"] == "step_start":
                started_at[chunk["step_uuid"]] = now
            elif chunk["event_type"] == "step_end":
                steps[chunk["step_type"]].append(now - started_at[chunk["step_uuid"]])
            answer = (chunk.get("response_message") or {}).get("content", answer)
    return time.perf_counter() - started, steps, answer


def bench_turn_breakdown(url: str, model: str | None, turns: int) -> dict[str, Any]:
    """Create the benchmark agent on ``url`` and time ``turns`` streamed turns (after one
    unrecorded warm-up)."""
    if model is None:
        model = json.loads(request(url + "/v1/models", method="GET"))["data"][0]["id"]
    documents = [{"uuid": f"fact-{i}", "content": base64.b64encode(f.encode()).decode(),
                  "mime_type": "text/plain", "metadata": {}} for i, f in enumerate(FACTS)]
    bank = f"agents-bench-{os.getpid()}"
    request(f"{url}/memory_banks/create?bank_uuid={bank}&bank_name=bench", documents)
    agent = f"agents-bench-{os.getpid()}"
    math_tool = {"tool_name": "math", "input_shields": [], "output_shields": []}
    request(url + "/agentic_system/create", {
        "uuid": agent, "instructions": "You are a helpful assistant.", "model": model,
        "available_tools": [math_tool], "executable_tools": ["math"], "memory_bank_uuids": [bank],
        "input_shields": [], "output_shields": [], "tool_choice": "required", "max_infer_iters": 2,
        "max_tokens": MAX_TOKENS})
    print("warm-up answer:", streamed_turn(url, agent)[2])  # embedding model, sympy, prefix cache
    before = step_histogram(url)
    walls, client = [], defaultdict(list)
    for _ in range(turns):
        wall, steps, _ = streamed_turn(url, agent)
        walls.append(wall)
        for step_type, seconds in steps.items():
            client[step_type].append(sum(seconds))
        print(f"turn {wall * 1000:.0f} ms: " + ", ".join(
            f"{k} {sum(v) * 1000:.0f} ms" for k, v in steps.items()), flush=True)
    after = step_histogram(url)
    request(f"{url}/agentic_system/delete?agent_id={agent}", method="DELETE")
    request(f"{url}/memory_banks/drop?bank_uuid={bank}", method="DELETE")
    server = {k: {"mean_ms": 1000 * (after[k][0] - before.get(k, (0, 0))[0]) / max(1, after[k][1] - before.get(k, (0, 0))[1]),
                  "count": after[k][1] - before.get(k, (0, 0))[1]} for k in after}
    inference_s = statistics.median(client["model_inference"]) if client["model_inference"] else float("nan")
    return {"turns": turns, "model": model, "turn_ms_median": 1000 * statistics.median(walls),
            "client_ms_median_per_turn": {k: 1000 * statistics.median(v) for k, v in client.items()},
            "server_step_mean_ms": server,
            "turn_over_inference": statistics.median(walls) / inference_s}


def write_results(report: dict[str, Any], results_dir: str) -> Path:
    os.makedirs(results_dir, exist_ok=True)
    stem = Path(results_dir) / f"agents-{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H%MZ')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    turn = report["turn"]
    lines = [f"# Agent turn breakdown ({report['date']})", "",
             f"- machine: {report['machine']['cpu']}, {report['machine']['cpus']} CPUs, load average "
             f"{report['machine']['load_average_1m']:.1f} (shared: other work ran beside this)",
             f"- command: `{report['command']}`",
             f"- model: {turn['model']}; {turn['turns']} streamed turns after one warm-up; memory bank of "
             f"{len(FACTS)} facts, math executable, tool_choice required, max_infer_iters 2, max_tokens {MAX_TOKENS}",
             "", f"Turn wall time, median: {turn['turn_ms_median']:.0f} ms; turn / its inference steps: "
             f"{turn['turn_over_inference']:.2f}", "",
             "| step type | client ms per turn (median) | server mean ms per step | steps |", "|---|---|---|---|"]
    for step_type, server in sorted(turn["server_step_mean_ms"].items()):
        client = turn["client_ms_median_per_turn"].get(step_type, float("nan"))
        lines.append(f"| {step_type} | {client:.1f} | {server['mean_ms']:.1f} | {server['count']} |")
    lines += ["", "## Code interpreter call latency", "", *table_lines(report["code_interpreter"])]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def run(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(spawned_server())
        turn = bench_turn_breakdown(url, args.model, args.turns)
    code_interpreter = bench_code_interpreter(args.code_cold_calls, args.code_warm_calls)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_1m": os.getloadavg()[0]},
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "turn": turn,
              "code_interpreter": code_interpreter}
    print(json.dumps({"turn": turn, "code_interpreter": code_interpreter}, indent=2))
    print("wrote", write_results(report, args.results_dir))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    run(parser.parse_args())
