"""GGUF loader: metadata -> ModelConfig, tensors -> packed or dense weights."""
from __future__ import annotations

import os

import numpy as np
import torch

from llama_engine.config import ModelConfig
from llama_engine.loader import HEAD_FORMAT, LoadedModel, ModelLoadError, Weight
from llama_engine.loader.gguf_file import GGUFFile, GGUFFormatError, GGUFTensor
from llama_engine.quant import BLOCK_BYTES, PackedWeight, dequantize as dequantize_packed

DENSE_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DENSE_NUMPY_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16: raw bits

# GGUF tensor name (after "blk.N.") -> our name
LAYER_TENSORS = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk",
    "attn_v.weight": "wv", "attn_output.weight": "wo", "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "w_gate", "ffn_up.weight": "w_up", "ffn_down.weight": "w_down",
}
GLOBAL_TENSORS = {"token_embd.weight": "embed", "output_norm.weight": "norm",
                  "output.weight": "lm_head", "rope_freqs.weight": "rope_freqs"}


def open_reader(path: str) -> GGUFFile:
    try:
        return GGUFFile(path)
    except GGUFFormatError as e:
        size = os.path.getsize(path)
        raise ModelLoadError(f"{path}: cannot read GGUF ({size} bytes; truncated or damaged?): {e}") from e
    except OSError as e:  # unreadable (permissions, a directory entry gone meanwhile, ...)
        raise ModelLoadError(f"{path}: cannot read GGUF: {e}") from e


def read_field(reader: GGUFFile, key: str, default=None):
    value = reader.metadata.get(key)
    if value is None:
        if default is None:
            raise ModelLoadError(f"GGUF metadata lacks '{key}'")
        return default
    return value


def read_config(reader: GGUFFile) -> ModelConfig:
    arch = read_field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"unsupported architecture '{arch}' (general.architecture); "
                             "llama-engine runs 'llama' models")
    p = f"{arch}."
    hidden = int(read_field(reader, p + "embedding_length"))
    heads = int(read_field(reader, p + "attention.head_count"))
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise ModelLoadError("GGUF has no 'token_embd.weight' tensor")
    vocab = shapes["token_embd.weight"][-1]
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(read_field(reader, p + "feed_forward_length")),
        num_layers=int(read_field(reader, p + "block_count")),
        num_heads=heads,
        num_kv_heads=int(read_field(reader, p + "attention.head_count_kv", heads)),
        head_dim=int(read_field(reader, p + "attention.key_length", hidden // heads)),
        max_position_embeddings=int(read_field(reader, p + "context_length", 2048)),
        rms_norm_eps=float(read_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(read_field(reader, p + "rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in shapes,
    )


def unpermute_rows(w: Weight, n_heads: int) -> Weight:
    """llama.cpp's converter interleaves the two rotary halves of each Q/K head; undo it
    so the model can use the HF "rotate half" convention for every format.

    The converter stores rows as orig.view(heads, 2, head_dim / 2, -1).transpose(1, 2), so one
    strided copy of the stored rows viewed as [heads, head_dim / 2, 2, -1] brings them back (a
    packed row is one output row's blocks, so the same move applies to its bytes)."""
    data = w.data if isinstance(w, PackedWeight) else w
    rows = data.shape[0]
    head_dim = rows // n_heads
    restored = data.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(data.shape)
    return PackedWeight(restored, w.qtype, w.rows, w.cols) if isinstance(w, PackedWeight) else restored


def read_tensor(t: GGUFTensor, dtype: torch.dtype, dequantize: bool) -> Weight:
    type_name = t.type_name
    data = t.data  # a view of the file's private mapping: a weight used as stored is not copied
    if type_name in DENSE_TYPES:
        raw = torch.from_numpy(data.view(DENSE_NUMPY_TYPES[type_name]))
        if type_name == "BF16":
            raw = raw.view(torch.bfloat16)
        return raw.reshape([int(d) for d in reversed(t.shape)]).to(dtype)
    if type_name in BLOCK_BYTES:
        cols, rows = int(t.shape[0]), int(t.shape[1]) if len(t.shape) > 1 else 1
        packed = PackedWeight(torch.from_numpy(data).reshape(rows, -1), type_name, rows, cols)
        return dequantize_packed(packed).to(dtype) if dequantize else packed
    raise ModelLoadError(f"tensor '{t.name}' has type {type_name}, which llama-engine cannot "
                         f"use (supported: {', '.join([*DENSE_TYPES, *BLOCK_BYTES])})")


def load_gguf(path: str, dtype: torch.dtype, dequantize: bool) -> LoadedModel:
    from llama_engine.tokenizer import Tokenizer
    reader = open_reader(path)
    config = read_config(reader)
    weights: dict[str, Weight] = {}
    for t in reader.tensors:
        if t.name in GLOBAL_TENSORS:
            name = GLOBAL_TENSORS[t.name]
        elif t.name.startswith("blk.") and t.name.split(".", 2)[2] in LAYER_TENSORS:
            _, layer, rest = t.name.split(".", 2)
            name = f"layers.{layer}.{LAYER_TENSORS[rest]}"
        else:
            raise ModelLoadError(f"tensor '{t.name}' is not part of a llama model")
        weights[name] = read_tensor(t, dtype, dequantize)
    for i in range(config.num_layers):
        weights[f"layers.{i}.wq"] = unpermute_rows(weights[f"layers.{i}.wq"], config.num_heads)
        weights[f"layers.{i}.wk"] = unpermute_rows(weights[f"layers.{i}.wk"], config.num_kv_heads)
    types = {t.name: t.type_name for t in reader.tensors}
    config.extra[HEAD_FORMAT] = types.get("output.weight", types["token_embd.weight"])
    if "rope_freqs" in weights:  # llama3 scaling, stored as per-frequency divisors
        config.extra["rope_freq_factors"] = weights.pop("rope_freqs").float().tolist()
    name = os.path.basename(path)
    return LoadedModel(name, config, weights, Tokenizer.from_gguf(reader.metadata))
