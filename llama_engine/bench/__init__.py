"""Benchmarks reachable as ``llama-engine bench <name>`` (scripts in benchmarks/ call the same code)."""
from __future__ import annotations

import argparse


def add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    from llama_engine.bench import throughput
    p = sub.add_parser("throughput", help="offline throughput against HF transformers")
    throughput.add_arguments(p)
    p.set_defaults(func=throughput.run)
