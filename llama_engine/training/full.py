"""Full fine-tuning on our own model (``model/llama.py``): every weight dense float32 and
trainable, checkpoints as HF folders. Implements ``TrainableModel``."""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama_engine.loader import load_model
from llama_engine.model.llama import DecoderLayer, Llama
from llama_engine.training.attention import PackedCausalAttention
from llama_engine.training.batching import PackedBatch
from llama_engine.training.checkpoint import (CAUSAL_LM, SEQUENCE_CLASSIFICATION, hf_config,
                                              save_hf_folder)
from llama_engine.training.distributed import DataParallel, FSDPOptions, ShardableModel, shard_llama

HF_LAYER = "model.layers.{}."
SCORE_HEAD = "score.weight"


def _trainable_llama(loaded) -> Llama:
    model = Llama(loaded.config, loaded.weights)  # a tied head shares the embedding parameter
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """Our model's weights under transformers' Llama names: the fused QKV and gate/up
    projections split back into their parts (rows in HF order, as the loaders keep them)."""
    c = model.config
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": model.embed.table.weight,
           "model.norm.weight": model.norm.weight}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        p = HF_LAYER.format(i)
        q, k, v = layer.qkv_proj.weight.split([q_rows, kv_rows, kv_rows])
        gate, up = layer.gate_up_proj.weight.split([c.intermediate_size] * 2)
        out.update({
            p + "input_layernorm.weight": layer.input_layernorm.weight,
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": layer.o_proj.weight,
            p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": layer.down_proj.weight})
    return out


def _checkpointed(layer: DecoderLayer):
    """DecoderLayer.forward recomputed in the backward pass instead of keeping its
    activations."""
    def forward(*args):
        return checkpoint(DecoderLayer.forward, layer, *args, use_reentrant=False)
    return forward


def checkpointed_layers(model: Llama) -> None:
    """Activation checkpointing per decoder layer (the spec's
    enable_activation_checkpointing)."""
    for layer in model.layers:
        layer.forward = _checkpointed(layer)


class FullFineTune(ShardableModel):
    """Every parameter of the model trains. ``reference()`` runs a frozen copy of the
    starting weights (made only when ``keep_reference``, for DPO)."""

    def __init__(self, model_path: str, keep_reference: bool = False,
                 activation_checkpointing: bool = False, device: str | torch.device = "cpu"):
        loaded = load_model(model_path, torch.float32, dequantize=True)
        self.source, self.tokenizer, self.config = model_path, loaded.tokenizer, loaded.config
        self.device = torch.device(device)
        self.model = _trainable_llama(loaded).to(self.device)
        self.frozen: Llama | None = None
        if keep_reference:
            self.frozen = copy.deepcopy(self.model).requires_grad_(False)
        if activation_checkpointing:
            checkpointed_layers(self.model)
        self._active = self.model

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        return self._active(batch.input_ids, batch.positions, PackedCausalAttention(batch))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._active.compute_logits(hidden)

    def output_weight(self) -> torch.Tensor | None:
        head = self._active.lm_head
        return head.weight if head is not None else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def shard(self, group: DataParallel, options: FSDPOptions) -> None:
        """FSDP over ``group``: the model per decoder layer, and the frozen reference copy
        the same way (it only runs forward, gathering a layer at a time)."""
        self.fsdp_units = shard_llama(self.model, group, options)
        if self.frozen is not None:
            shard_llama(self.frozen, group, options)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        if self.frozen is None:
            raise RuntimeError("this model was built without a reference copy (keep_reference)")
        self._active = self.frozen
        try:
            yield
        finally:
            self._active = self.model

    def save_checkpoint(self, folder: Path, score_head: torch.Tensor | None = None) -> None:
        tensors = hf_state_dict(self.model)
        architecture = CAUSAL_LM
        if score_head is not None:  # LlamaForSequenceClassification: no LM head, a score head
            tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
            tensors[SCORE_HEAD] = score_head
            architecture = SEQUENCE_CLASSIFICATION
        config = hf_config(self.config, architecture, self.tokenizer.bos_token_id,
                           self.tokenizer.eos_token_id)
        if score_head is not None:
            config["tie_word_embeddings"] = False
        save_hf_folder(folder, tensors, config, self.source, self.tokenizer)

    def load_checkpoint(self, folder: Path) -> None:
        saved = load_file(os.path.join(folder, "model.safetensors"))
        with torch.no_grad():
            for name, param in hf_state_dict(self.model).items():
                if name in saved:
                    param.copy_(saved[name])
