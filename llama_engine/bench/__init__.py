"""Benchmarks reachable as ``llama-engine bench <name>`` (scripts in benchmarks/ call the same code)."""
from __future__ import annotations

import argparse


def add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    from llama_engine.bench import throughput
    p = sub.add_parser("throughput", help="offline throughput against HF transformers")
    throughput.add_arguments(p)
    p.set_defaults(func=throughput.run)

    from server.bench_serving import add_bench_serving_arguments, bench_serving
    p = sub.add_parser("serving", help="load a running server with Poisson arrivals")
    add_bench_serving_arguments(p)
    p.set_defaults(func=bench_serving)
