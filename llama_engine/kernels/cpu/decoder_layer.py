"""Torch-facing wrappers of the fused decoder-layer ops (csrc/decoder_layer.cpp) for packed
weights.

``qkv_projection`` and ``o_proj_and_mlp`` compute exactly what ``llama_engine.kernels``
composes from rms_norm, linear, rope and silu_and_mul, in one extension call each: at
decode those ops take microseconds, about what a Python call costs. ``decoder_layer`` runs
both halves with the paged store and attention between them. Tensors go to the extension
as checked views (csrc/views.h); a layer's weights are gathered and checked once, by
``decoder_layer_params``, and a step's attention metadata once, by
``ops.attention_metadata``.
"""
from __future__ import annotations

import torch

from llama_engine import _C
from llama_engine.kernels.cpu.quant import packed_view
from llama_engine.kernels.options import options
from llama_engine.quant import PackedWeight

F32 = torch.float32


def qkv_projection(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                   eps: float, wqkv: PackedWeight, positions: torch.Tensor,
                   cos_sin: torch.Tensor, num_heads: int, num_kv_heads: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm(x + residual) -> fused QKV projection -> RoPE on q and k.

    x float32 [T, C]; positions int64 [T]; cos_sin float32 [P, D]. Returns q [T, H, D], k
    and v [T, Hkv, D] and the new residual (x + residual, or x itself when residual is
    None). Raises ValueError naming a tensor whose dtype, rank or shape does not fit.
    """
    tokens, head_dim = x.shape[0], cos_sin.shape[-1]
    q = torch.empty(tokens, num_heads, head_dim, dtype=F32)
    k = torch.empty(tokens, num_kv_heads, head_dim, dtype=F32)
    v = torch.empty(tokens, num_kv_heads, head_dim, dtype=F32)
    new_residual = None if residual is None else torch.empty(x.shape, dtype=F32)
    _C.qkv_projection(x, residual, norm_weight, eps, packed_view(wqkv), positions, cos_sin,
                      q, k, v, new_residual, options().int8_activations)
    return q, k, v, x if residual is None else new_residual


def o_proj_and_mlp(attn: torch.Tensor, residual: torch.Tensor, wo: PackedWeight,
                   norm_weight: torch.Tensor, eps: float, w_gate_up: PackedWeight,
                   w_down: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """attn [T, A] or [T, H, D]: h = attn @ wo^T; (normed, new_residual) = RMSNorm(h +
    residual); returns (down(silu(gate) * up) of normed, new_residual), both [T, C]."""
    if attn.dim() != 2:  # [T, H, D] straight from attention
        attn = attn.reshape(attn.shape[0], -1)
    out = torch.empty(residual.shape, dtype=F32)
    new_residual = torch.empty(residual.shape, dtype=F32)
    _C.o_proj_and_mlp(attn, residual, packed_view(wo), norm_weight, eps, packed_view(w_gate_up),
                      packed_view(w_down), out, new_residual,
                      options().int8_activations)
    return out, new_residual


def decoder_layer_params(attn_norm: torch.Tensor, wqkv: PackedWeight, wo: PackedWeight,
                         ffn_norm: torch.Tensor, w_gate_up: PackedWeight, w_down: PackedWeight,
                         eps: float, num_heads: int, num_kv_heads: int) -> _C.DecoderLayerParams:
    """One layer's weights for ``decoder_layer``, checked against each other once: norms
    float32 [C], wqkv [(H + 2 Hkv) D, C], wo [C, H D], w_gate_up [2F, C], w_down [C, F].
    Raises ValueError naming the weight that does not fit."""
    return _C.DecoderLayerParams(attn_norm.float().contiguous(), packed_view(wqkv),
                                 packed_view(wo), ffn_norm.float().contiguous(),
                                 packed_view(w_gate_up), packed_view(w_down), eps, num_heads,
                                 num_kv_heads)


def decoder_layer(params: _C.DecoderLayerParams, x: torch.Tensor,
                  residual: torch.Tensor | None, positions: torch.Tensor,
                  cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  metadata: _C.AttentionMetadata,
                  lora: tuple[_C.LoRASegments, tuple[_C.LoRAProjection | None, ...]] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv_projection, store_kv + paged attention over the layer's caches, then
    o_proj_and_mlp, in one extension call. x float32 [T, C], residual [T, C] or None (the
    first layer), positions int64 [T]. lora: the step's segments and the adapters of the
    fused QKV, output, fused gate/up and down projections (``lora.lora_projection``; None where
    no adapter applies), added after each projection's matmul. Returns (layer output, new
    residual), both [T, C]. Raises ValueError naming an argument that does not fit."""
    out = torch.empty(x.shape, dtype=F32)
    new_residual = torch.empty(x.shape, dtype=F32)
    segments, (qkv, o, gate_up, down) = lora if lora is not None else (None, (None,) * 4)
    _C.decoder_layer(params, x, residual, positions, cos_sin, k_cache, v_cache, metadata, out,
                     new_residual, options().int8_activations, segments, qkv, o, gate_up, down)
    return out, new_residual

