"""llama-engine: a performance-first inference engine for Llama-architecture models."""
import os

# The extension shares torch's OpenMP runtime (torch loads its libgomp.so.1 first, and the
# extension's libgomp.so.1 dependency resolves to that copy). After a parallel region its
# idle workers spin this many iterations (~0.1 ms) before sleeping: long enough to bridge
# the gaps between one decode step's kernel calls, where waking a sleeping worker cost tens
# of microseconds per matmul (OMP_WAIT_POLICY=PASSIVE: 11 ms per SmolLM2 token instead of
# 4.8 on 2 cores), and short enough that an idle engine gives the cores back at once.
# Set before the runtime starts; a value the user chose wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import importlib  # noqa: E402

# The public names load on first use (PEP 562), so that `import llama_engine` costs nothing
# until one is needed: the command line reads its arguments (and pauses the garbage
# collector, see startup.py) before torch loads.
_EXPORTS = {"LLM": "llama_engine.llm", "SamplingParams": "llama_engine.sampling_params",
            "RequestOutput": "llama_engine.outputs", "CompletionOutput": "llama_engine.outputs",
            "LoRARequest": "llama_engine.lora_request"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
