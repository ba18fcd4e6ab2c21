"""Shared fixtures: the default model (ours and transformers'), and tiny random checkpoints."""
from __future__ import annotations

import os

# Triton kernels run under Triton's interpreter on these CPU-only machines. The variable must
# be set before anything imports triton (peft and transformers may, while collecting), so
# here, first. On a GPU, run with TRITON_INTERPRET=0 to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from llama_engine.loader import default_model_path


@pytest.fixture(scope="session")
def default_gguf() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def hf_default_model(default_gguf):
    """transformers' own load of the same GGUF, dequantized to fp32: the reference."""
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(default_gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def default_llm():
    from llama_engine import LLM
    return LLM()


def make_tiny_llama(folder: str, seed: int = 0, tie: bool = False,
                    llama3_scaling: bool = True, reward_model: bool = False) -> str:
    """Save a tiny random Llama (GQA, optional llama3 rope scaling) with transformers, and
    the SmolLM2 tokenizer beside it, as a real HF checkpoint folder; ``reward_model``: a
    LlamaForSequenceClassification with num_labels 1 (a score head) instead of an LM head."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=tie,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        if llama3_scaling else None,
    )
    if reward_model:
        config.num_labels = 1
    model = (transformers.LlamaForSequenceClassification if reward_model
             else transformers.LlamaForCausalLM)(config)
    with torch.no_grad():  # larger weights than the default init, so logits are not flat
        for p in model.parameters():
            p.mul_(4.0)
    # small shards: the loader must follow model.safetensors.index.json
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="5MB")
    gguf_folder, gguf_name = os.path.split(default_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_name)
    tok.save_pretrained(folder)
    return folder
