"""One dispatch point per hot op.

Each function here picks the implementation for its inputs: Triton kernels for CUDA
tensors, the C++ extension (``llama_engine._C``) for float32 CPU tensors, and the plain
torch reference (``reference.py``) otherwise. ``LLAMA_ENGINE_KERNELS=torch`` forces the
reference everywhere (for debugging and for A/B checks).
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from llama_engine.kernels import reference
from llama_engine.quant import PackedWeight

FORCE_TORCH = os.environ.get("LLAMA_ENGINE_KERNELS", "") == "torch"

try:
    from llama_engine.kernels import cpu as _cpu
except ImportError:  # extension not built: the torch reference still runs everything
    _cpu = None


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and not FORCE_TORCH


def _use_cpu(t: Tensor) -> bool:
    return (_cpu is not None and not FORCE_TORCH and t.device.type == "cpu"
            and t.dtype == torch.float32)


def _triton():
    from llama_engine.kernels import triton as triton_kernels
    return triton_kernels


def rms_norm(x: Tensor, weight: Tensor, eps: float,
             residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if _use_triton(x):
        return _triton().rms_norm(x, weight, eps, residual)
    if _use_cpu(x):
        return _cpu.rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def rope(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor) -> tuple[Tensor, Tensor]:
    if _use_triton(q):
        return _triton().rope(q, k, positions, cos_sin)
    if _use_cpu(q):
        return _cpu.rope(q, k, positions, cos_sin)
    return reference.rope(q, k, positions, cos_sin)


def silu_and_mul(gate_up: Tensor) -> Tensor:
    if _use_triton(gate_up):
        return _triton().silu_and_mul(gate_up)
    if _use_cpu(gate_up):
        return _cpu.silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor) -> None:
    if _use_triton(k):
        return _triton().store_kv(k, v, k_cache, v_cache, slot_mapping)
    if _use_cpu(k) and k_cache.dtype == torch.float32:
        return _cpu.store_kv(k, v, k_cache, v_cache, slot_mapping)
    return reference.store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    context_lens: Tensor, cu_seqlens_q: Tensor, scale: float) -> Tensor:
    if _use_triton(q):
        return _triton().paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                         cu_seqlens_q, scale)
    if _use_cpu(q) and k_cache.dtype == torch.float32:
        return _cpu.paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                    cu_seqlens_q, scale)
    return reference.paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                     cu_seqlens_q, scale)


def store_kv_and_attend(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                        slot_mapping: Tensor, block_tables: Tensor, context_lens: Tensor,
                        cu_seqlens_q: Tensor, scale: float) -> Tensor:
    """store_kv of the step's new keys and values, then paged_attention over the caches
    (one extension call on the CPU, where decode runs the pair in every layer)."""
    if _use_cpu(q) and k_cache.dtype == torch.float32:
        return _cpu.store_kv_and_attend(q, k, v, k_cache, v_cache, slot_mapping, block_tables,
                                        context_lens, cu_seqlens_q, scale)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q,
                           scale)


def linear(x: Tensor, weight: Tensor | PackedWeight) -> Tensor:
    """y = x @ W^T for a dense or packed (GGUF block format) weight."""
    if isinstance(weight, PackedWeight):
        if _use_triton(x):
            return _triton().quant_matmul(x, weight)
        if _use_cpu(x):
            return _cpu.quant_matmul(x, weight)
        return x @ dequantize(weight).to(x.dtype).t()
    return torch.nn.functional.linear(x, weight)


# ---- decoder-layer ops ---------------------------------------------------------------------
# Packed weights on the CPU run each of these as one fused extension call (at decode every
# op inside is cheaper than a Python call); everything else composes the ops above.

# attend(layer, q [T, H, D], k, v [T, Hkv, D]) -> attention output [T, H, D]
AttendFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]

def _packed_on_cpu(*weights: Tensor | PackedWeight) -> bool:
    for w in weights:
        if not (isinstance(w, PackedWeight) and w.data.is_cpu):
            return False
    return True


def qkv_projection(x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float,
                   wqkv: Tensor | PackedWeight, positions: Tensor, cos_sin: Tensor,
                   num_heads: int, num_kv_heads: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RMSNorm(x + residual) -> fused QKV projection -> RoPE on q and k.

    Returns q [T, H, D], k and v [T, Hkv, D] (D = cos_sin's width) and the new residual
    (x + residual; x itself when residual is None).
    """
    if _use_cpu(x) and _packed_on_cpu(wqkv):
        return _cpu.qkv_projection(x, residual, norm_weight, eps, wqkv, positions, cos_sin,
                                   num_heads, num_kv_heads)
    h, residual = rms_norm(x, norm_weight, eps, residual)
    head_dim = cos_sin.shape[1]
    kv_size = num_kv_heads * head_dim
    q, k, v = linear(h, wqkv).split([num_heads * head_dim, kv_size, kv_size], dim=-1)
    q, k = rope(q.reshape(-1, num_heads, head_dim).contiguous(),
                k.reshape(-1, num_kv_heads, head_dim).contiguous(), positions, cos_sin)
    return q, k, v.reshape(-1, num_kv_heads, head_dim).contiguous(), residual


def o_proj_and_mlp(attn: Tensor, residual: Tensor, wo: Tensor | PackedWeight,
                 norm_weight: Tensor, eps: float, w_gate_up: Tensor | PackedWeight,
                 w_down: Tensor | PackedWeight) -> tuple[Tensor, Tensor]:
    """Output projection, then RMSNorm with the residual add, then the SwiGLU MLP.

    attn is [T, A] or [T, H, D]; returns (MLP output, new residual), both [T, C].
    """
    if _use_cpu(attn) and _packed_on_cpu(wo, w_gate_up, w_down):
        return _cpu.o_proj_and_mlp(attn, residual, wo, norm_weight, eps, w_gate_up, w_down)
    h, residual = rms_norm(linear(attn.reshape(attn.shape[0], -1), wo), norm_weight, eps,
                           residual)
    return linear(silu_and_mul(linear(h, w_gate_up)), w_down), residual


class PagedAttention:
    """``attend(layer, q, k, v)`` over paged KV caches for one step: stores the step's new
    keys and values at their slots, then attends (``store_kv_and_attend``). The model only
    calls it; ``decoder_layer`` recognises it and, on the CPU, runs the whole layer with it
    in one extension call."""

    def __init__(self, k_caches: list[Tensor], v_caches: list[Tensor], slot_mapping: Tensor,
                 block_tables: Tensor, context_lens: Tensor, cu_seqlens_q: Tensor,
                 scale: float):
        self.k_caches, self.v_caches = k_caches, v_caches
        self.slot_mapping, self.block_tables = slot_mapping, block_tables
        self.context_lens, self.cu_seqlens_q, self.scale = context_lens, cu_seqlens_q, scale
        self.cpu_step = None  # the CPU kernels' checked arguments, the same every layer

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return store_kv_and_attend(q, k, v, self.k_caches[layer], self.v_caches[layer],
                                   self.slot_mapping, self.block_tables, self.context_lens,
                                   self.cu_seqlens_q, self.scale)


class DecoderLayerWeights(NamedTuple):
    """One decoder layer's parameters, as ``decoder_layer`` takes them."""
    attn_norm: Tensor
    wqkv: Tensor | PackedWeight
    wo: Tensor | PackedWeight
    ffn_norm: Tensor
    w_gate_up: Tensor | PackedWeight
    w_down: Tensor | PackedWeight
    eps: float
    num_heads: int
    num_kv_heads: int


def decoder_layer(layer: int, x: Tensor, residual: Tensor | None, positions: Tensor,
                  cos_sin: Tensor, weights: DecoderLayerWeights, attend: AttendFn
                  ) -> tuple[Tensor, Tensor]:
    """One pre-norm decoder layer: qkv_projection, attend(layer, q, k, v), o_proj_and_mlp.
    Returns (layer output, new residual). Packed weights on the CPU with PagedAttention run
    it as one extension call."""
    w = weights
    if (_use_cpu(x) and isinstance(attend, PagedAttention)
            and attend.k_caches[layer].dtype == torch.float32
            and _packed_on_cpu(w.wqkv, w.wo, w.w_gate_up, w.w_down)):
        return _cpu.decoder_layer(layer, x, residual, positions, cos_sin, w, attend)
    q, k, v, residual = qkv_projection(x, residual, w.attn_norm, w.eps, w.wqkv, positions,
                                       cos_sin, w.num_heads, w.num_kv_heads)
    return o_proj_and_mlp(attend(layer, q, k, v), residual, w.wo, w.ffn_norm, w.eps,
                        w.w_gate_up, w.w_down)


def dequantize(weight: PackedWeight) -> Tensor:
    if _cpu is not None and not FORCE_TORCH and weight.data.device.type == "cpu":
        return _cpu.dequantize(weight)
    from llama_engine.quant import dequantize as torch_dequantize
    return torch_dequantize(weight)


def embedding(ids: Tensor, weight: Tensor | PackedWeight) -> Tensor:
    if isinstance(weight, PackedWeight):
        return dequantize(weight.select_rows(ids.long()))
    return torch.nn.functional.embedding(ids, weight)


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
           min_p: Tensor, uniform: Tensor) -> Tensor:
    if _use_triton(logits):
        return _triton().sample(logits, temperature, top_k, top_p, min_p, uniform)
    if _use_cpu(logits):
        return _cpu.sample(logits, temperature, top_k, top_p, min_p, uniform)
    return reference.sample(logits, temperature, top_k, top_p, min_p, uniform)
