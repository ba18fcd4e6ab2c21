"""llama-engine: a performance-first inference engine for Llama-architecture models."""
import os

# torch and our extension each bring an OpenMP runtime; spinning idle threads of one
# starve the other on a small machine (30x slower decode on 2 cores). Set before either
# runtime starts; a value the user chose wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llama_engine.llm import LLM  # noqa: E402
from llama_engine.outputs import CompletionOutput, RequestOutput  # noqa: E402
from llama_engine.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
