"""Serving benchmark: streaming requests against a running server, at Poisson arrival rates
(or a fixed concurrency); reports throughput and TTFT / TPOT / inter-token latency, saves JSON
and a plot of latency against load under benchmarks/results/.

    python benchmarks/serving.py --base-url http://127.0.0.1:8321 --request-rates 1,4,16
    llama-engine bench serving --request-rates 1,4,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import aiohttp

DEFAULT_BASE_URL = "http://127.0.0.1:8321"
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DEFAULT_RATES = "1,4,16"
DEFAULT_NUM_PROMPTS = 32
DEFAULT_MAX_TOKENS = 32
REQUEST_TIMEOUT_S = 1800
PERCENTILES = (50, 90, 99)
MS_PER_S = 1000.0
# Short, varied user turns, so prompts differ in length and content but stay realistic.
PROMPTS = [
    "Name three primary colors.", "What is the capital of Japan?", "Write a haiku about rain.",
    "Explain what a CPU cache is in two sentences.", "Give me a synonym for happy.",
    "How many legs does a spider have?", "Suggest a name for a pet turtle.",
    "What is 12 times 7?", "Describe the smell of fresh bread.", "List four kinds of trees.",
    "Why is the sky blue?", "Translate 'good morning' into French.",
    "Summarize the plot of Cinderella in one sentence.", "What does a compiler do?",
    "Give one tip for learning to swim.", "What is the boiling point of water in Fahrenheit?",
]


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    inter_token_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> Optional[float]:
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def add_bench_serving_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", "--url", dest="base_url", default=DEFAULT_BASE_URL)
    parser.add_argument("--model", default=None, help="model id or alias (default: the first listed)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--request-rates", default=DEFAULT_RATES,
                        help="comma-separated requests/s for Poisson arrivals; 'inf' sends all at once")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="cap on requests in flight (with rate 'inf': a closed loop of N clients)")
    parser.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS, help="requests per rate")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--tag", default="serving", help="prefix of the result file names")


def parse_rates(text: str) -> list[float]:
    return [math.inf if part.strip() == "inf" else float(part) for part in text.split(",") if part.strip()]


async def resolve_model(session: aiohttp.ClientSession, base_url: str, model: Optional[str]) -> str:
    if model:
        return model
    async with session.get(f"{base_url}/v1/models") as response:
        response.raise_for_status()
        return (await response.json())["data"][0]["id"]


async def stream_one(session: aiohttp.ClientSession, base_url: str, body: dict[str, Any]) -> RequestResult:
    """Send one streaming chat request; time its first token and every token after it."""
    started = time.perf_counter()
    arrivals: list[float] = []
    result = RequestResult(ok=False)
    try:
        async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                return RequestResult(ok=False, error=f"HTTP {response.status}: {(await response.text())[:200]}")
            async for raw_line in response.content:
                line = raw_line.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(choice["delta"].get("content") for choice in chunk.get("choices", [])):
                    arrivals.append(time.perf_counter())
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}")
    if not arrivals:
        return RequestResult(ok=False, error="no tokens received")
    result.ok = True
    result.ttft_s = arrivals[0] - started
    result.latency_s = arrivals[-1] - started
    result.inter_token_s = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    return result


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean_ms": math.nan, **{f"p{p}_ms": math.nan for p in PERCENTILES}}
    ordered = sorted(values)

    def percentile(p: float) -> float:  # nearest-rank on the sorted sample
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    return {"mean_ms": statistics.fmean(values) * MS_PER_S,
            **{f"p{p}_ms": percentile(p) * MS_PER_S for p in PERCENTILES}}


async def run_rate(session: aiohttp.ClientSession, args: argparse.Namespace, model: str,
                   rate: float) -> dict[str, Any]:
    rng = random.Random(args.seed)
    limit = asyncio.Semaphore(args.max_concurrency or args.num_prompts)

    async def send(index: int) -> RequestResult:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
                "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
                "stream_options": {"include_usage": True}}
        async with limit:
            return await stream_one(session, args.base_url, body)

    started = time.perf_counter()
    tasks = []
    for index in range(args.num_prompts):
        tasks.append(asyncio.create_task(send(index)))
        if not math.isinf(rate):
            await asyncio.sleep(rng.expovariate(rate))  # Poisson process: exponential gaps
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - started
    return report(rate, args.max_concurrency, duration, results)


def report(rate: float, max_concurrency: Optional[int], duration_s: float,
           results: list[RequestResult]) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "max_concurrency": max_concurrency,
        "duration_s": duration_s,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_prompt_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": output_tokens,
        "ttft": summarize([r.ttft_s for r in done]),
        "tpot": summarize([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl": summarize([gap for r in done for gap in r.inter_token_s]),
        "e2e_latency": summarize([r.latency_s for r in done]),
    }


def print_report(row: dict[str, Any]) -> None:
    print(f"rate={row['request_rate']} req/s  concurrency={row['max_concurrency']}  "
          f"completed={row['completed']} failed={row['failed']}  "
          f"{row['request_throughput']:.2f} req/s  {row['output_throughput']:.1f} tok/s")
    for metric in ("ttft", "tpot", "itl", "e2e_latency"):
        stats = row[metric]
        print(f"  {metric:12s} mean {stats['mean_ms']:9.1f} ms  p50 {stats['p50_ms']:9.1f}  "
              f"p90 {stats['p90_ms']:9.1f}  p99 {stats['p99_ms']:9.1f}")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    load = [row["request_throughput"] for row in rows]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, metric, label in zip(axes, ("ttft", "tpot", "itl"),
                                   ("time to first token", "time per output token", "inter-token latency")):
        for percentile, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^:")):
            axis.plot(load, [row[metric][percentile] for row in rows], style, label=percentile[:-3])
        axis.set_xlabel("achieved load (requests/s)")
        axis.set_ylabel("ms")
        axis.set_title(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)  # the benchmark, not the client, limits concurrency
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
        model = await resolve_model(session, args.base_url, args.model)
        rows = []
        for rate in parse_rates(args.request_rates):
            row = await run_rate(session, args, model, rate)
            print_report(row)
            rows.append(row)
    return {"model": model, "base_url": args.base_url, "num_prompts": args.num_prompts,
            "max_tokens": args.max_tokens, "temperature": args.temperature,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "results": rows}


def bench_serving(args: argparse.Namespace) -> dict[str, Any]:
    summary = asyncio.run(run(args))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    json_path = args.results_dir / f"{args.tag}_{stamp}.json"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    png_path = json_path.with_suffix(".png")
    plot(summary["results"], png_path, f"{summary['model']}: latency against load "
                                      f"({args.num_prompts} streaming requests per rate, {args.max_tokens} tokens)")
    print(f"saved {json_path} and {png_path}")
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_serving_arguments(parser)
    bench_serving(parser.parse_args(argv))


if __name__ == "__main__":
    main()
