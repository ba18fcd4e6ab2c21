"""HF checkpoint loader: config.json + model.safetensors (or a sharded index)."""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from llama_engine.config import ModelConfig, RopeScaling
from llama_engine.loader import LoadedModel, ModelLoadError, check_score_head

SUPPORTED_MODEL_TYPES = {"llama"}

# HF name (after "model.layers.N.") -> our name
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo", "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
GLOBAL_TENSORS = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm",
                  "lm_head.weight": "lm_head", "score.weight": "score"}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ModelLoadError(f"{folder}: no config.json (not an HF model folder)")
    with open(path) as f:
        c = json.load(f)
    model_type = c.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"unsupported architecture '{model_type}' (config.json model_type); "
                             "llama-engine runs 'llama' models")
    scaling = c.get("rope_scaling") or (c.get("rope_parameters") or {})
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in (None, "default", "llama3"):
        raise ModelLoadError(f"unsupported rope_scaling type '{rope_type}' (config.json)")
    heads = c["num_attention_heads"]
    return ModelConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        rms_norm_eps=c.get("rms_norm_eps", 1e-5),
        rope_theta=c.get("rope_theta", scaling.get("rope_theta", 10000.0)),
        rope_scaling=RopeScaling(
            factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"],
        ) if rope_type == "llama3" else None,
        tie_word_embeddings=c.get("tie_word_embeddings", False),
    )


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise ModelLoadError(f"{folder}: no model.safetensors nor model.safetensors.index.json")


def _our_name(hf_name: str) -> str | None:
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    if hf_name.endswith(IGNORED_SUFFIXES):
        return None
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_TENSORS:
        return f"layers.{parts[2]}.{LAYER_TENSORS[parts[3]]}"
    raise ModelLoadError(f"tensor '{hf_name}' is not part of a llama model")


def load_hf(folder: str, dtype: torch.dtype) -> LoadedModel:
    from llama_engine.tokenizer import Tokenizer
    config = read_config(folder)
    weights = {}
    for path in _safetensors_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for hf_name in f.keys():
                    name = _our_name(hf_name)
                    if name is not None:
                        weights[name] = f.get_tensor(hf_name).to(dtype)
        except (OSError, RuntimeError) as e:
            raise ModelLoadError(f"{path}: cannot read safetensors: {e}") from e
    if "lm_head" in weights and config.tie_word_embeddings:
        del weights["lm_head"]
    if "score" in weights:  # LlamaForSequenceClassification: a reward model
        check_score_head(weights["score"], config, f"{folder}: score.weight")
    name = os.path.basename(os.path.normpath(folder))
    return LoadedModel(name, config, weights, Tokenizer.from_pretrained(folder))
