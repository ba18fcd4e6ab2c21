"""All benchmark code. ``llama-engine bench <name>`` reaches the ones below; each module also
runs as a script (``python benchmarks/<name>.py``)."""
from __future__ import annotations

import argparse


def add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    from benchmarks import throughput
    p = sub.add_parser("throughput", help="offline throughput against HF transformers")
    throughput.add_arguments(p)
    p.set_defaults(func=throughput.run)

    from benchmarks import training
    p = sub.add_parser("training", help="full fine-tuning steps against transformers + torch.optim")
    training.add_arguments(p)
    p.set_defaults(func=training.run)

    from benchmarks.serving import add_bench_serving_arguments, bench_serving
    p = sub.add_parser("serving", help="load a running server with Poisson arrivals")
    add_bench_serving_arguments(p)
    p.set_defaults(func=bench_serving)

    from benchmarks import memory
    p = sub.add_parser("memory", help="memory-bank ingest and query latency against sentence-transformers + faiss")
    memory.add_arguments(p)
    p.set_defaults(func=memory.run)

    from benchmarks import startup
    p = sub.add_parser("startup", help="time to the first token (LLM, serve) beside llama.cpp")
    startup.add_arguments(p)
    p.set_defaults(func=startup.run)
