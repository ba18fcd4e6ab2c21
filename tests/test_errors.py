"""Bad input gets a clear error naming the problem, not a traceback from deep inside."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from llama_engine import LLM, SamplingParams
from llama_engine.loader import ModelLoadError, load_model


def test_missing_file():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/nonexistent/model.gguf")


def test_truncated_gguf(tmp_path, default_gguf):
    cut = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as f:
        cut.write_bytes(f.read(1_000_000))
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        load_model(str(cut))


def test_not_a_model(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(junk))


def test_unsupported_architecture_gguf(tmp_path):
    import gguf
    path = str(tmp_path / "mamba.gguf")
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="unsupported architecture 'mamba'"):
        load_model(path)


def test_unsupported_architecture_hf(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_unsupported_tensor_type(tmp_path):
    import gguf
    import numpy as np
    path = str(tmp_path / "q2.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in [("add_block_count", 1), ("add_embedding_length", 32),
                       ("add_feed_forward_length", 64), ("add_head_count", 2),
                       ("add_context_length", 64)]:
        getattr(writer, key)(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 84), dtype=np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'token_embd.weight' has type Q2_K"):
        load_model(path)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_k": -5}, "top_k"), ({"n": 0}, "n"), ({"logprobs": 50}, "logprobs"),
    ({"stop": [""]}, "stop"), ({"min_p": 1.5}, "min_p"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**kwargs)


def test_empty_and_overlong_prompts(default_llm):
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        default_llm.generate("")
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        default_llm.generate([[]])
    with pytest.raises(ValueError, match="leaves no room to generate"):
        default_llm.generate([[5] * default_llm.engine.max_model_len])
    # a prompt only scored (max_tokens=0) fills the context exactly, and no more
    with pytest.raises(ValueError, match="^prompt: the prompt is 8193 tokens, more than the "
                                         "model's context length of 8192 tokens$"):
        default_llm.generate([[5] * (default_llm.engine.max_model_len + 1)],
                             SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match=r"prompt: token ids must be integers in \[0, 49152\)"):
        default_llm.generate([[1, 2, 10**9]])
    # the engine still serves after rejecting them
    out = default_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3))
    assert len(out[0].outputs[0].token_ids) == 3


def test_degenerate_sampling_values_are_normalised_or_refused(default_llm):
    assert SamplingParams(temperature=1e-9).temperature == 0.0  # greedy, not an overflow
    assert SamplingParams(top_k=2**40).top_k == 0  # beyond any vocabulary: no limit
    assert SamplingParams(top_p=1e-100).top_p == 1e-6  # zero in float32: the top token
    outs = default_llm.generate(["Hi", "Hello"], [SamplingParams(temperature=1e-9, max_tokens=4),
                                                 SamplingParams(top_k=2**40, max_tokens=4)])
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
