"""One dispatch point per hot op.

Each function here picks the implementation for its inputs: Triton kernels for CUDA
tensors, the C++ extension (``llama_engine._C``) for float32 CPU tensors, and the plain
torch reference (``reference.py``) otherwise. ``LLAMA_ENGINE_KERNELS=torch`` forces the
reference everywhere (for debugging and for A/B checks).
"""
from __future__ import annotations

import os

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


def linear(x: Tensor, weight: Tensor | PackedWeight) -> Tensor:
    """y = x @ W^T for a dense or packed (GGUF block format) weight."""
    if isinstance(weight, PackedWeight):
        if _use_triton(x):
            return _triton().quant_matmul(x, weight)
        if _use_cpu(x):
            return _cpu.quant_matmul(x, weight)
        return x @ dequantize(weight).to(x.dtype).t()
    return torch.nn.functional.linear(x, weight)


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
