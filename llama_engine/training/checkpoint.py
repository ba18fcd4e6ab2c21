"""Checkpoints as HF model folders (config.json, model.safetensors, tokenizer files) that
transformers and ``llama-engine serve --model`` load, plus the training state that lets an
interrupted job resume."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llama_engine.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")
TRAINING_STATE_FILE = "training_state.pt"
ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
CAUSAL_LM, SEQUENCE_CLASSIFICATION = "LlamaForCausalLM", "LlamaForSequenceClassification"


def hf_config(config: ModelConfig, architecture: str, bos_token_id: int | None,
              eos_token_id: int | None) -> dict[str, Any]:
    """config.json for ``config`` (transformers' LlamaConfig keys). Raises ValueError when
    the rope frequencies cannot be expressed there (GGUF per-frequency factors)."""
    if config.extra.get("rope_freq_factors") is not None and config.rope_scaling is None:
        raise ValueError("this model's rope frequency factors (GGUF rope_freqs) have no "
                         "config.json form; save from an HF checkpoint instead")
    out: dict[str, Any] = {
        "architectures": [architecture], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
    }
    if config.rope_scaling is not None:
        s = config.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor,
                               "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_position_embeddings}
    if architecture == SEQUENCE_CLASSIFICATION:
        # transformers scores the last token that is not padding. Our reward head reads each
        # sequence's last token, often EOS, so EOS must not count as padding; BOS never ends
        # a sequence, so it is the pad id (pad batches on the right with it).
        out.update(num_labels=1, pad_token_id=bos_token_id)
    return out


def copy_tokenizer(source: str, tokenizer: Any, folder: Path) -> None:
    """The tokenizer files of the model at ``source``: copied from an HF folder, or, for a
    GGUF file, written from the loaded tokenizer (tokenizer.json and a tokenizer_config.json
    holding the chat template and the special tokens)."""
    if os.path.isdir(source):
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), folder / name)
        return
    # The Tokenizer wraps an HF `tokenizers` backend; saving it gives the tokenizer.json that
    # transformers and Tokenizer.from_pretrained read.
    tokenizer._backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tokenizer.chat_template,
              "clean_up_tokenization_spaces": False}
    for key, token_id in (("bos_token", tokenizer.bos_token_id), ("eos_token", tokenizer.eos_token_id)):
        if token_id is not None:
            config[key] = tokenizer.id_to_token(token_id)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_hf_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                   tokenizer_source: str, tokenizer: Any) -> None:
    """Write an HF model folder: model.safetensors (contiguous tensors), config.json and the
    tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(tokenizer_source, tokenizer, folder)
