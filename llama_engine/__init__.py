"""llama-engine: a performance-first inference engine for Llama-architecture models.

Importing the package has no side effects and does not load torch: ``LLM`` does, when it
starts (after setting the OpenMP policy, see ``llama_engine.openmp``).
"""
from llama_engine.llm import LLM
from llama_engine.outputs import CompletionOutput, RequestOutput
from llama_engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
