"""Packed GGUF weights through the quantized kernels give the dequantized-fp32 model's
greedy text."""
from __future__ import annotations

from llama_engine import LLM, SamplingParams
from tests.test_model_vs_transformers import PROMPTS

GREEDY_TOKENS = 32


def test_packed_greedy_equals_dequantized(default_llm):
    dense = LLM(dequantize=True)
    assert all(getattr(m, "packed", None) is None for m in dense.engine.model.modules())
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    packed_out = default_llm.generate(PROMPTS, params)
    dense_out = dense.generate(PROMPTS, params)
    for prompt, p, d in zip(PROMPTS, packed_out, dense_out):
        assert p.outputs[0].token_ids == d.outputs[0].token_ids, prompt
