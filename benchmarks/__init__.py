"""All benchmark code. ``llama-engine bench <name>`` reaches the ones below; each module also
runs as a script (``python benchmarks/<name>.py``)."""
from __future__ import annotations

import argparse
import importlib

# name -> (module, its argument builder, its entry point, help)
COMMANDS = {
    "throughput": ("throughput", "add_arguments", "run",
                   "offline throughput against HF transformers"),
    "training": ("training", "add_arguments", "run",
                 "full fine-tuning steps against transformers + torch.optim"),
    "serving": ("serving", "add_bench_serving_arguments", "bench_serving",
                "load a running server with Poisson arrivals"),
    "memory": ("memory", "add_arguments", "run",
               "memory-bank ingest and query latency against sentence-transformers + faiss"),
    "startup": ("startup", "add_arguments", "run",
                "time to the first token (LLM, serve) beside llama.cpp"),
    "agents": ("agents", "add_arguments", "run",
               "an agent turn's step breakdown and the code interpreter's cold and warm calls"),
    "synthetic-data": ("synthetic_data", "add_arguments", "run",
                       "prompts x k samples scored by a reward model, against transformers "
                       "in interleaved rounds"),
    "lora": ("lora", "add_arguments", "run",
             "decode with 0-16 LoRA adapters per batch vs the base and transformers + peft"),
}


def add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    for name, (module_name, add_arguments, run, help_text) in COMMANDS.items():
        module = importlib.import_module(f"benchmarks.{module_name}")
        parser = sub.add_parser(name, help=help_text)
        getattr(module, add_arguments)(parser)
        parser.set_defaults(func=getattr(module, run))
