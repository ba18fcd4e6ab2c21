"""Code-interpreter latency (issue 14 section 6): a cold call (a new session: the jail and its
worker start, then the code runs) and a warm call (the session's worker already runs), beside
the naive peer, a fresh ``python -I -c CODE`` per call (no jail, no state kept between calls).
Goal on the 2-core CPU: warm under 50 ms, cold under 500 ms.

    python benchmarks/code_interpreter.py                  # jail, and unsafe mode beside it
    python benchmarks/code_interpreter.py --calls 100

``bench_code_interpreter()`` returns the numbers (the agents benchmark calls it); run as a
script, results also go to benchmarks/results/code-interpreter-<date>.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_engine.agents.sandbox import (CodeInterpreter, sandbox_unavailable_reason)  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# What a model's first call usually does: define a value and print something.
COLD_CODE = "total = sum(range(1000))\nprint(total)"
WARM_CODE = "total += 1\nprint(total)"
WARM_GOAL_MS, COLD_GOAL_MS = 50.0, 500.0


def summary(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {"calls": len(ms), "p50_ms": statistics.median(ms),
            "p99_ms": ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], "min_ms": ms[0]}


def time_mode(allow_unsafe: bool, cold_calls: int, warm_calls: int) -> dict:
    """Cold: each call opens a new session (and closes it after, untimed). Warm: calls in one
    session after its first."""
    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="bench-code-interpreter-") as scratch:
        interpreter = CodeInterpreter(scratch, allow_unsafe=allow_unsafe)
        try:
            for index in range(cold_calls):
                started = time.perf_counter()
                result = interpreter.run(f"cold{index}", COLD_CODE)
                cold.append(time.perf_counter() - started)
                assert result.stdout == "499500\n", result
                interpreter.close_session(f"cold{index}")
            interpreter.run("warm", COLD_CODE)
            for _ in range(warm_calls):
                started = time.perf_counter()
                result = interpreter.run("warm", WARM_CODE)
                warm.append(time.perf_counter() - started)
                assert result.error is None, result
        finally:
            interpreter.close()
    return {"cold": summary(cold), "warm": summary(warm)}


def time_fresh_python(calls: int) -> dict:
    """The peer: a new interpreter per call, as a stateless code tool would run it."""
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-c", COLD_CODE], check=True, capture_output=True)
        seconds.append(time.perf_counter() - started)
    return summary(seconds)


def bench_code_interpreter(cold_calls: int = 20, warm_calls: int = 200) -> dict:
    """Cold and warm call latency in the jail (when bubblewrap works here) and in the unsafe
    mode, and the fresh-``python -c`` peer, all in this run. Keys: ``jail`` (None when
    unavailable, with ``jail_unavailable`` saying why), ``unsafe``, ``fresh_python``."""
    reason = sandbox_unavailable_reason()
    report = {"load_average": round(os.getloadavg()[0], 2),
              "jail": None if reason else time_mode(False, cold_calls, warm_calls),
              "jail_unavailable": reason,
              "unsafe": time_mode(True, cold_calls, warm_calls),
              "fresh_python": time_fresh_python(cold_calls)}
    report["load_average_end"] = round(os.getloadavg()[0], 2)
    return report


def table_lines(report: dict) -> list[str]:
    """The latency table and the goals verdict for a ``bench_code_interpreter()`` report."""
    peer = report["fresh_python"]
    lines = [f"- cold: a new session per call (jail + worker start, then `{COLD_CODE!r}`); warm: "
             f"`{WARM_CODE!r}` in a running session; peer: `python -I -c` per call "
             "(no jail, no state); load average "
             f"{report['load_average']} at start, {report['load_average_end']} at end", "",
             "| mode | cold p50 / p99 ms | warm p50 / p99 ms | peer p50 ms | cold / peer | "
             "warm / peer |", "|---|---|---|---|---|---|"]
    for mode in ("jail", "unsafe"):
        numbers = report[mode]
        if numbers is None:
            lines.append(f"| {mode} | unavailable: {report['jail_unavailable']} | | | | |")
            continue
        cold, warm = numbers["cold"], numbers["warm"]
        lines.append(f"| {mode} | {cold['p50_ms']:.1f} / {cold['p99_ms']:.1f} | "
                     f"{warm['p50_ms']:.2f} / {warm['p99_ms']:.2f} | {peer['p50_ms']:.1f} | "
                     f"{cold['p50_ms'] / peer['p50_ms']:.2f}x | "
                     f"{warm['p50_ms'] / peer['p50_ms']:.3f}x |")
    jail = report["jail"] or report["unsafe"]
    lines += ["", f"Goals: warm < {WARM_GOAL_MS:g} ms: "
                  f"{'met' if jail['warm']['p99_ms'] < WARM_GOAL_MS else 'NOT met'} (p99); "
                  f"cold < {COLD_GOAL_MS:g} ms: "
                  f"{'met' if jail['cold']['p99_ms'] < COLD_GOAL_MS else 'NOT met'} (p99)."]
    return lines


def render_markdown(report: dict) -> str:
    lines = [f"# Code interpreter call latency, CPU, {report['date']}", "",
             f"- machine: {report['machine']}", f"- command: `{report['command']}`",
             *table_lines(report)]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cold-calls", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200, help="warm calls")


def add_call_arguments(parser: argparse.ArgumentParser) -> None:
    """The call counts, for a benchmark that runs this one inside it (benchmarks/agents.py)."""
    parser.add_argument("--code-cold-calls", type=int, default=20)
    parser.add_argument("--code-warm-calls", type=int, default=200)


def run(args: argparse.Namespace) -> None:
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "command": "python benchmarks/code_interpreter.py " + " ".join(sys.argv[1:]),
              **bench_code_interpreter(args.cold_calls, args.calls)}
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"code-interpreter-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(render_markdown(report))
    print(render_markdown(report))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
