"""llama-engine: a performance-first inference engine for Llama-architecture models.

Importing the package has no side effects and does not load torch: ``LLM`` does, when it
starts (after setting the OpenMP policy, see ``llama_engine.openmp``). The public names
load on first use (PEP 562), so that `import llama_engine` costs nothing until one is
needed: the command line reads its arguments (and pauses the garbage collector, see
startup.py) before torch loads.
"""
import importlib

_EXPORTS = {"LLM": "llama_engine.llm", "SamplingParams": "llama_engine.sampling_params",
            "RequestOutput": "llama_engine.outputs", "CompletionOutput": "llama_engine.outputs",
            "LoRARequest": "llama_engine.lora_request"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
