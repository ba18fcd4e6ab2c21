"""The Llama model, whole, in one file: GQA attention, RoPE (llama3 scaling), SwiGLU,
RMSNorm, tied or untied output head.

The model only composes layers. Every hot op goes through ``llama_engine.kernels``, and
attention over past tokens is the caller's business: ``forward`` takes an ``attend``
function (layer index, q, k, v -> output) that the model runner builds over its paged KV
cache, so nothing here knows how the cache is laid out.
"""
from __future__ import annotations

import torch
from torch import nn

from llama_engine import kernels
from llama_engine.config import ModelConfig, rope_inv_freq
from llama_engine.quant import PackedWeight

Weight = torch.Tensor | PackedWeight
AttendFn = kernels.AttendFn


def concat_rows(weights: list[Weight]) -> Weight:
    """Stack [N_i, K] weights into one [sum N_i, K] so fused projections run as one matmul."""
    if all(isinstance(w, PackedWeight) for w in weights) and len({w.qtype for w in weights}) == 1:
        data = torch.cat([w.data for w in weights])
        return PackedWeight(data, weights[0].qtype, data.shape[0], weights[0].cols)
    dense = [kernels.dequantize(w) if isinstance(w, PackedWeight) else w for w in weights]
    return torch.cat(dense)


class Linear(nn.Module):
    """y = x @ W^T, W dense or packed; the kernel is chosen by ``kernels.linear``."""

    def __init__(self, weight: Weight):
        super().__init__()
        if isinstance(weight, PackedWeight):
            self.packed = weight
            self.weight = None
        else:
            self.packed = None
            self.weight = nn.Parameter(weight, requires_grad=False)

    @property
    def matrix(self) -> Weight:
        return self.packed if self.packed is not None else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.matrix)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class DecoderLayer(nn.Module):
    """Attention, then the SwiGLU MLP, each with a pre-norm and a residual: one
    ``kernels.decoder_layer`` call (a single fused extension call on the CPU)."""

    def __init__(self, config: ModelConfig, w: dict[str, Weight]):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.attn_norm = RMSNorm(w["attn_norm"], config.rms_norm_eps)
        self.wqkv = Linear(concat_rows([w["wq"], w["wk"], w["wv"]]))
        self.wo = Linear(w["wo"])
        self.ffn_norm = RMSNorm(w["ffn_norm"], config.rms_norm_eps)
        self.w_gate_up = Linear(concat_rows([w["w_gate"], w["w_up"]]))
        self.w_down = Linear(w["w_down"])
        self._weights: kernels.DecoderLayerWeights | None = None  # gathered on first use

    def forward(self, layer: int, x: torch.Tensor, residual: torch.Tensor | None,
                positions: torch.Tensor, cos_sin: torch.Tensor, attend: AttendFn
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._weights is None:
            self._weights = kernels.DecoderLayerWeights(
                self.attn_norm.weight, self.wqkv.matrix, self.wo.matrix, self.ffn_norm.weight,
                self.w_gate_up.matrix, self.w_down.matrix, self.attn_norm.eps,
                self.num_heads, self.num_kv_heads)
        return kernels.decoder_layer(layer, x, residual, positions, cos_sin, self._weights,
                                     attend)

    def _apply(self, fn, recurse=True):
        self._weights = None  # .to() and friends replace the parameters: gather them again
        return super()._apply(fn, recurse)


def rope_cache(config: ModelConfig, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim]: cos in the first half of the columns, sin in the second."""
    inv_freq = torch.tensor(rope_inv_freq(config), dtype=torch.float64)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


class Llama(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict[str, Weight]):
        super().__init__()
        self.config = config
        self.embed = weights["embed"]
        self.layers = nn.ModuleList(
            DecoderLayer(config, _layer_weights(weights, i)) for i in range(config.num_layers))
        self.norm = RMSNorm(weights["norm"], config.rms_norm_eps)
        head = self.embed if config.tie_word_embeddings else weights["lm_head"]
        self.lm_head = Linear(head)
        self.register_buffer("cos_sin", rope_cache(config, config.max_position_embeddings),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attend: AttendFn) -> torch.Tensor:
        """input_ids, positions: [T] for all tokens of the step; returns hidden [T, C]."""
        x = kernels.embedding(input_ids, self.embed)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(i, x, residual, positions, self.cos_sin, attend)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def _layer_weights(weights: dict[str, Weight], i: int) -> dict[str, Weight]:
    prefix = f"layers.{i}."
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
