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

from llama_engine.llm import LLM  # noqa: E402
from llama_engine.lora_request import LoRARequest  # noqa: E402
from llama_engine.outputs import CompletionOutput, RequestOutput  # noqa: E402
from llama_engine.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "LoRARequest"]
