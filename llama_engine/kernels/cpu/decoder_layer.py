"""Torch-facing wrappers of the fused decoder-layer halves (csrc/decoder_layer.cpp) for packed weights.

``qkv_projection`` and ``o_proj_and_mlp`` compute exactly what ``llama_engine.kernels``
composes from rms_norm, linear, rope and silu_and_mul, in one extension call each: at
decode those ops take microseconds, about what a Python call costs. Like the other CPU
wrappers they pass addresses, so the checks that keep the addresses safe are here.
"""
from __future__ import annotations

import torch

from llama_engine import _C
from llama_engine.kernels.cpu.ops import _cache_shape, _converted, _fail
from llama_engine.kernels.cpu.quant import INT8_ACTIVATIONS_DEFAULT, _packed_bytes
from llama_engine.quant import PackedWeight

F32, I32, I64 = torch.float32, torch.int32, torch.int64


def _activation_rows(x: torch.Tensor, name: str, width: int) -> torch.Tensor:
    """x as dense float32 [T, width] (copied only when strided or not 2-D)."""
    if not (x.dtype is F32 and x.is_cpu and x.dim() == 2 and x.is_contiguous()):
        if x.dtype is not F32 or not x.is_cpu:
            _fail(name, f"expected float32 on the CPU, got {x.dtype} on {x.device}")
        x = x.reshape(-1, x.shape[-1]).contiguous()
    if x.shape[1] != width:
        _fail(name, f"expected {width} features, got {x.shape[1]}")
    return x


def _token_inputs(x: torch.Tensor, hidden: int, positions: torch.Tensor,
                  cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x as dense float32 [T, hidden], positions as int64 [T], cos_sin as float32 [P, D]."""
    rows = _activation_rows(x, "x", hidden)
    positions = _converted(positions, I64, "positions", 1)
    if positions.shape[0] != rows.shape[0]:
        _fail("positions", "one per token expected")
    return rows, positions, _converted(cos_sin, F32, "cos_sin", 2)


def _residual_rows(residual: torch.Tensor, tokens: int, hidden: int) -> torch.Tensor:
    residual = _activation_rows(residual, "residual", hidden)
    if residual.shape[0] != tokens:
        _fail("residual", f"expected {tokens} rows, got {residual.shape[0]}")
    return residual


def _packed(weight: PackedWeight, rows: int, cols: int, name: str) -> tuple:
    if weight.rows != rows or weight.cols != cols:
        _fail(name, f"expected a [{rows}, {cols}] weight, got [{weight.rows}, {weight.cols}]")
    data = _packed_bytes(weight)
    return data.data_ptr(), data.shape[0], data.shape[1], weight.qtype


def qkv_projection(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                   eps: float, wqkv: PackedWeight, positions: torch.Tensor,
                   cos_sin: torch.Tensor, num_heads: int, num_kv_heads: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm(x + residual) -> fused QKV projection -> RoPE on q and k.

    Returns q [T, H, D], k and v [T, Hkv, D] and the new residual (x + residual, or x itself
    when residual is None); D is cos_sin's width.
    """
    hidden = norm_weight.shape[0]
    rows, positions, cos_sin = _token_inputs(x, hidden, positions, cos_sin)
    tokens, (max_pos, head_dim) = rows.shape[0], cos_sin.shape
    norm_weight = _converted(norm_weight, F32, "norm_weight", 1)
    weight = _packed(wqkv, (num_heads + 2 * num_kv_heads) * head_dim, hidden, "wqkv")
    if residual is None:
        new_residual, residual_ptr, new_residual_ptr = x, 0, 0
    else:
        residual = _residual_rows(residual, tokens, hidden)
        new_residual = torch.empty_like(rows)
        residual_ptr, new_residual_ptr = residual.data_ptr(), new_residual.data_ptr()
    q = torch.empty(tokens, num_heads, head_dim, dtype=F32)
    k = torch.empty(tokens, num_kv_heads, head_dim, dtype=F32)
    v = torch.empty(tokens, num_kv_heads, head_dim, dtype=F32)
    _C.qkv_projection(rows.data_ptr(), residual_ptr, norm_weight.data_ptr(), eps,
                      new_residual_ptr, weight, positions.data_ptr(), cos_sin.data_ptr(),
                      max_pos, q.data_ptr(), k.data_ptr(), v.data_ptr(), tokens, hidden,
                      num_heads, num_kv_heads, head_dim, INT8_ACTIVATIONS_DEFAULT)
    return q, k, v, new_residual


def o_proj_and_mlp(attn: torch.Tensor, residual: torch.Tensor, wo: PackedWeight,
                 norm_weight: torch.Tensor, eps: float, w_gate_up: PackedWeight,
                 w_down: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """attn [T, A] or [T, H, D]: h = attn @ wo^T; (normed, new_residual) = RMSNorm(h +
    residual); returns (down(silu(gate) * up) of normed, new_residual), both [T, C]."""
    hidden = norm_weight.shape[0]
    if attn.dim() != 2:  # [T, H, D] straight from attention
        attn = attn.reshape(attn.shape[0], -1)
    rows = _activation_rows(attn, "attn", wo.cols)
    tokens = rows.shape[0]
    residual = _residual_rows(residual, tokens, hidden)
    norm_weight = _converted(norm_weight, F32, "norm_weight", 1)
    ffn_width = w_down.cols
    out_weight = _packed(wo, hidden, wo.cols, "wo")
    gate_up = _packed(w_gate_up, 2 * ffn_width, hidden, "w_gate_up")
    down = _packed(w_down, hidden, ffn_width, "w_down")
    out = torch.empty(tokens, hidden, dtype=F32)
    new_residual = torch.empty(tokens, hidden, dtype=F32)
    _C.o_proj_and_mlp(rows.data_ptr(), wo.cols, residual.data_ptr(), out_weight,
                    norm_weight.data_ptr(), eps, gate_up, down, out.data_ptr(),
                    new_residual.data_ptr(), tokens, hidden, ffn_width,
                    INT8_ACTIVATIONS_DEFAULT)
    return out, new_residual


def decoder_layer(layer: int, x: torch.Tensor, residual: torch.Tensor | None,
                  positions: torch.Tensor, cos_sin: torch.Tensor, weights,
                  attention) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv_projection, store_kv_and_attend over ``attention`` (a kernels.PagedAttention) for
    ``layer``, then o_proj_and_mlp, in one extension call; weights is a kernels.DecoderLayerWeights.
    Returns (layer output, new residual), both [T, C]."""
    hidden = weights.attn_norm.shape[0]
    rows, positions, cos_sin = _token_inputs(x, hidden, positions, cos_sin)
    tokens, (max_pos, head_dim) = rows.shape[0], cos_sin.shape
    heads, kv_heads = weights.num_heads, weights.num_kv_heads
    ffn_width = weights.w_down.cols
    residual_ptr = 0 if residual is None else _residual_rows(residual, tokens, hidden).data_ptr()
    k_cache, v_cache = attention.k_caches[layer], attention.v_caches[layer]
    if attention.cpu_step is None:
        attention.cpu_step = _step_arguments(attention, kv_heads, head_dim)
    step, cache_shape = attention.cpu_step[:2]
    if _cache_shape(k_cache, "k_cache") != cache_shape or \
            _cache_shape(v_cache, "v_cache") != cache_shape:
        _fail("k_cache/v_cache", "every layer's caches must have the same layout")
    out = torch.empty(tokens, hidden, dtype=F32)
    new_residual = torch.empty(tokens, hidden, dtype=F32)
    _C.decoder_layer(
        rows.data_ptr(), residual_ptr,
        _converted(weights.attn_norm, F32, "attn_norm", 1).data_ptr(),
        _converted(weights.ffn_norm, F32, "ffn_norm", 1).data_ptr(), weights.eps,
        _packed(weights.wqkv, (heads + 2 * kv_heads) * head_dim, hidden, "wqkv"),
        _packed(weights.wo, hidden, heads * head_dim, "wo"),
        _packed(weights.w_gate_up, 2 * ffn_width, hidden, "w_gate_up"),
        _packed(weights.w_down, hidden, ffn_width, "w_down"),
        positions.data_ptr(), cos_sin.data_ptr(), max_pos, k_cache.data_ptr(),
        v_cache.data_ptr(), step, out.data_ptr(), new_residual.data_ptr(), tokens, hidden,
        heads, kv_heads, head_dim, ffn_width, INT8_ACTIVATIONS_DEFAULT)
    return out, new_residual


def _step_arguments(attention, kv_heads: int, head_dim: int) -> tuple:
    """(the step tuple of _C.decoder_layer, the cache shape, the tensors behind its
    addresses), checked once per step: every layer attends with the same metadata."""
    cache_shape = _cache_shape(attention.k_caches[0], "k_cache")
    num_blocks, block_size, cache_kv_heads, cache_head_dim = cache_shape
    if cache_kv_heads != kv_heads or cache_head_dim != head_dim:
        _fail("k_cache", "[Hkv, D] must match the model's")
    slots = _converted(attention.slot_mapping, I64, "slot_mapping", 1)
    tables = _converted(attention.block_tables, I32, "block_tables", 2)
    lens = _converted(attention.context_lens, I32, "context_lens", 1)
    cu_seqlens = _converted(attention.cu_seqlens_q, I32, "cu_seqlens_q", 1)
    num_seqs = lens.numel()
    if cu_seqlens.numel() != num_seqs + 1 or tables.shape[0] < num_seqs:
        _fail("cu_seqlens_q / block_tables", "one entry per sequence expected")
    if slots.numel() != int(cu_seqlens[-1]):
        _fail("slot_mapping", "one slot per query token expected")
    step = (num_blocks, block_size, slots.data_ptr(), tables.data_ptr(), tables.shape[1],
            lens.data_ptr(), cu_seqlens.data_ptr(), num_seqs, attention.scale)
    return step, cache_shape, (slots, tables, lens, cu_seqlens)
