"""The loaded default model keeps its weights packed: about the GGUF file's size."""
from __future__ import annotations

import os

from llama_engine.quant import PackedWeight

PACKED_SLACK = 1.10  # fused projections and norms add a little to the file's bytes


def test_default_model_weights_stay_packed(default_llm, default_gguf):
    model = default_llm.engine.model
    packed = [m.packed for m in model.modules() if getattr(m, "packed", None) is not None]
    assert packed and all(isinstance(p, PackedWeight) for p in packed)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.embed.nbytes() if isinstance(model.embed, PackedWeight) else 0
    # the tied head shares the embedding's bytes, so count it once
    packed_bytes = sum(p.nbytes() for p in packed if p is not model.embed) + embed
    held = packed_bytes + dense_bytes
    assert held <= os.path.getsize(default_gguf) * PACKED_SLACK
