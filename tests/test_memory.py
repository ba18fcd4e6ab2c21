"""The loaded default model keeps its weights packed: about the GGUF file's size."""
from __future__ import annotations

import os

from llama_engine.quant import PackedWeight

PACKED_SLACK = 1.10  # fused projections and norms add a little to the file's bytes


def test_default_model_weights_stay_packed(default_llm, default_gguf):
    model = default_llm.engine.model
    packed = [m.packed for m in model.modules() if getattr(m, "packed", None) is not None]
    assert packed and all(isinstance(p, PackedWeight) for p in packed)
    # packed weights are buffers of the module tree; the tied head shares the embedding's
    # storage, so each storage counts once
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in [*model.parameters(), *model.buffers()]}
    held = sum(tensors.values())
    assert held <= os.path.getsize(default_gguf) * PACKED_SLACK
