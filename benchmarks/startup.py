"""Start-up time: how long until llama-engine can answer, each measured in fresh processes.

Three figures for llama-engine, one for llama.cpp on the same GGUF:
  * imports: ``import llama_engine``, then ``from llama_engine import LLM`` (the offline API:
    torch and the engine), inside a fresh interpreter;
  * LLM to first token: from spawning ``python`` until ``LLM(model).generate(prompt,
    max_tokens=1)`` has its token (interpreter start, imports, loading, the first forward);
  * serve to first token: from spawning ``llama-engine serve`` until the first streamed token
    of a ``/v1/completions`` request arrives (the request is sent as soon as the port accepts);
  * llama.cpp: from spawning ``python`` until llama-cpp-python's ``Llama(model)`` has generated
    one token (skipped with a note when ``llama_cpp`` is not importable: the ``bench`` extra).

Every figure is the best and the median of ``--runs`` runs, the kinds taking turns so that load
drift on a shared machine hits all alike, after one unrecorded warm-up start of each kind (it
fills the page cache and, as an installed package has them, the bytecode caches: children run
with PYTHONDONTWRITEBYTECODE unset). Beside each wall time stands the process's CPU time (user +
system, all threads) at the same moment: on a machine shared with other work it is the steadier
figure. ``--source DIR`` measures another checkout of the engine (with its extension built),
e.g. an older commit for a before/after comparison.

    python benchmarks/startup.py --runs 5 --results-dir benchmarks/results
    llama-engine bench startup --runs 5     # the same
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time

from benchmarks.throughput import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = "127.0.0.1"
PROMPT = "The capital of France is"
SERVED_MODEL_ID = "startup-bench"
PORT_POLL_INTERVAL_S = 0.01
TIMEOUT_S = 600  # one start on a heavily shared 2-core machine can take minutes
MARKER = "STARTUP "  # prefix of the line a child prints with its own timings (JSON)

IMPORT_CHILD = f"""
import json, time
start = time.perf_counter()
import llama_engine
package = time.perf_counter()
from llama_engine import LLM
print({MARKER!r} + json.dumps({{"import_s": package - start, "import_llm_s": time.perf_counter() - package}}),
      flush=True)
"""

LLM_CHILD = f"""
import json, sys, time
start = time.perf_counter()
from llama_engine import LLM, SamplingParams
imported = time.perf_counter()
llm = LLM(sys.argv[1] or None)
built = time.perf_counter()
llm.generate({PROMPT!r}, SamplingParams(temperature=0, max_tokens=1))
done = time.perf_counter()
print({MARKER!r} + json.dumps({{"import_s": imported - start, "construct_s": built - imported,
                              "first_token_s": done - built}}), flush=True)
"""

LLAMACPP_CHILD = f"""
import json, sys, time
start = time.perf_counter()
import llama_cpp
imported = time.perf_counter()
llm = llama_cpp.Llama(sys.argv[1], n_threads=int(sys.argv[2]), n_threads_batch=int(sys.argv[2]),
                      verbose=False)
built = time.perf_counter()
llm.create_completion({PROMPT!r}, max_tokens=1, temperature=0)
done = time.perf_counter()
print({MARKER!r} + json.dumps({{"import_s": imported - start, "construct_s": built - imported,
                              "first_token_s": done - built}}), flush=True)
"""


def _child_env(source: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = source + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a running process has used, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def run_child(code: str, args: list[str], source: str) -> dict[str, float]:
    """Spawn ``python -c code args``; returns the child's own timings plus ``wall_s`` and
    ``cpu_s``, the time and the child's CPU time from spawning it until it printed them."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, *args], cwd=source, env=_child_env(source),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timings = None
    for line in process.stdout:
        if line.startswith(MARKER):
            timings = json.loads(line[len(MARKER):])
            timings["wall_s"] = time.perf_counter() - start
            timings["cpu_s"] = process_cpu_s(process.pid)
    _, stderr = process.communicate(timeout=TIMEOUT_S)
    if process.returncode != 0 or timings is None:
        raise RuntimeError(f"child failed (exit {process.returncode}):\n{stderr[-4000:]}")
    return timings


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _wait_for_port(process: subprocess.Popen, port: int, deadline: float) -> None:
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-engine serve exited with {process.returncode} before listening")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            time.sleep(PORT_POLL_INTERVAL_S)
    raise TimeoutError(f"llama-engine serve did not listen on port {port} within {TIMEOUT_S} s")


def _first_streamed_token(port: int) -> None:
    """POST a streaming /v1/completions and return once a chunk with text has arrived."""
    body = json.dumps({"model": SERVED_MODEL_ID, "prompt": PROMPT, "max_tokens": 1,
                       "temperature": 0, "stream": True})
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=TIMEOUT_S)
    try:
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"/v1/completions answered {response.status}: {response.read()[:500]!r}")
        for raw in response:
            line = raw.decode("utf-8").strip()
            if line.startswith("data:") and line != "data: [DONE]":
                if any(choice.get("text") for choice in json.loads(line[5:])["choices"]):
                    return
        raise RuntimeError("the stream ended without a token")
    finally:
        connection.close()


def run_serve(model: str, source: str) -> dict[str, float]:
    """Spawn ``llama-engine serve``; time until it listens and until its first streamed token."""
    port = free_port()
    command = [sys.executable, "-m", "llama_engine.cli", "serve", "--model", f"{SERVED_MODEL_ID}={model}",
               "--port", str(port), "--log-level", "WARNING"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=source, env=_child_env(source), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_port(process, port, start + TIMEOUT_S)
        listening = time.perf_counter()
        _first_streamed_token(port)
        return {"listen_s": listening - start, "wall_s": time.perf_counter() - start,
                "cpu_s": process_cpu_s(process.pid)}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def llamacpp_available() -> str | None:
    """llama-cpp-python's version, or None when it is not installed."""
    try:
        return subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except subprocess.CalledProcessError:
        return None


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per timing: best (minimum) and median over the runs."""
    return {key: {"best": min(r[key] for r in runs), "median": statistics.median(r[key] for r in runs)}
            for key in runs[0]}


def git_commit(source: str) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=source).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


ROWS = (  # (kind, timing key, label)
    ("import", "import_s", "`import llama_engine` (in-process)"),
    ("import", "import_llm_s", "then `from llama_engine import LLM`"),
    ("llm", "wall_s", "LLM(): spawn to first token"),
    ("llm", "cpu_s", "  its CPU time"),
    ("llm", "import_s", "  of which imports"),
    ("llm", "construct_s", "  of which LLM() construction"),
    ("llm", "first_token_s", "  of which the first token"),
    ("serve", "listen_s", "`llama-engine serve`: spawn to listening"),
    ("serve", "wall_s", "`llama-engine serve`: spawn to first streamed token"),
    ("serve", "cpu_s", "  its CPU time"),
    ("llamacpp", "wall_s", "llama.cpp Llama(): spawn to first token"),
    ("llamacpp", "cpu_s", "  its CPU time"),
    ("llamacpp", "import_s", "  of which `import llama_cpp`"),
    ("llamacpp", "construct_s", "  of which Llama() construction"),
    ("llamacpp", "first_token_s", "  of which the first token"),
)


def render_markdown(report: dict) -> str:
    lines = [
        f"# Start-up time, {report['date']}",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']['cpu']}, {report['machine']['cpus']} CPUs, {report['machine']['platform']}",
        f"- llama-engine {report['label']} ({report['source']}); model `{os.path.basename(report['model'])}`",
        f"- llama.cpp: {report['llamacpp'] or 'not measured: llama-cpp-python is not installed'}",
        f"- load average (1 min) before / after: {report['load_before'][0]:.2f} / {report['load_after'][0]:.2f}",
        f"- {report['runs']} runs of each after a warm-up, in fresh processes, the kinds taking turns; "
        "CPU time: user + system of the process, all threads, at the same moment",
        "",
        "| what | best s | median s |",
        "|---|---:|---:|",
    ]
    for kind, key, label in ROWS:
        stats = report["results"].get(kind, {}).get(key)
        if stats:
            lines.append(f"| {label} | {stats['best']:.2f} | {stats['median']:.2f} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file (default: the SmolLM2 GGUF)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
    parser.add_argument("--source", default=ROOT, help="the llama-engine checkout to measure")
    parser.add_argument("--label", default=None, help="what --source is (default: its git commit)")
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--results-dir", default=None, help="write startup-<date>.json/.md here")


def run(args: argparse.Namespace) -> dict:
    """Measure, print the table, write the results files if asked; returns the report."""
    source = os.path.abspath(args.source)
    model = args.model or subprocess.run(
        [sys.executable, "-c", "from llama_engine.loader import default_model_path; print(default_model_path())"],
        capture_output=True, text=True, check=True, cwd=source, env=_child_env(source)).stdout.strip()
    llamacpp = None if args.skip_llamacpp else llamacpp_available()

    kinds = {"import": lambda: run_child(IMPORT_CHILD, [], source),
             "llm": lambda: run_child(LLM_CHILD, [model], source)}
    if not args.skip_serve:
        kinds["serve"] = lambda: run_serve(model, source)
    if llamacpp:
        kinds["llamacpp"] = lambda: run_child(LLAMACPP_CHILD, [model, str(args.threads)], source)
    load_before = os.getloadavg()
    for measure in kinds.values():
        measure()  # warm-up
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for index in range(args.runs):
        for kind, measure in kinds.items():
            runs[kind].append(measure())
            print(f"run {index + 1}/{args.runs} {kind}: {runs[kind][-1]}", flush=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "source": source, "label": args.label or git_commit(source), "model": model, "runs": args.runs,
        "llamacpp": llamacpp and f"llama-cpp-python {llamacpp}, {args.threads} threads",
        "load_before": list(load_before), "load_after": list(os.getloadavg()),
        "results": {kind: summarize(kind_runs) for kind, kind_runs in runs.items()},
        "raw": runs,
    }
    markdown = render_markdown(report)
    print(markdown)
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        stem = os.path.join(args.results_dir, f"startup-{now.strftime('%Y-%m-%dT%H%MZ')}")
        with open(stem + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
