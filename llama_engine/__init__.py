"""llama-engine: a performance-first inference engine for Llama-architecture models."""
from llama_engine.llm import LLM
from llama_engine.outputs import CompletionOutput, RequestOutput
from llama_engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
