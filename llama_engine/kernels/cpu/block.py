"""Torch-facing wrappers of the fused block halves (csrc/block.cpp) for packed weights.

``qkv_projection`` and ``block_output`` compute exactly what ``llama_engine.kernels``
composes from rms_norm, linear, rope and silu_and_mul, in one extension call each: at
decode those ops take microseconds, about what a Python call costs. Like the other CPU
wrappers they pass addresses, so the checks that keep the addresses safe are here.
"""
from __future__ import annotations

import torch

from llama_engine import _C
from llama_engine.kernels.cpu.ops import _converted, _fail
from llama_engine.kernels.cpu.quant import INT8_ACTIVATIONS_DEFAULT, _packed_bytes
from llama_engine.quant import PackedWeight

F32, I64 = torch.float32, torch.int64


def _activation_rows(x: torch.Tensor, name: str, width: int) -> torch.Tensor:
    """x as dense float32 [T, width] (copied only when strided or not 2-D)."""
    if not (x.dtype is F32 and x.is_cpu and x.dim() == 2 and x.is_contiguous()):
        if x.dtype is not F32 or not x.is_cpu:
            _fail(name, f"expected float32 on the CPU, got {x.dtype} on {x.device}")
        x = x.reshape(-1, x.shape[-1]).contiguous()
    if x.shape[1] != width:
        _fail(name, f"expected {width} features, got {x.shape[1]}")
    return x


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
    rows = _activation_rows(x, "x", hidden)
    tokens = rows.shape[0]
    norm_weight = _converted(norm_weight, F32, "norm_weight", 1)
    positions = _converted(positions, I64, "positions", 1)
    if positions.shape[0] != tokens:
        _fail("positions", "one per token expected")
    cos_sin = _converted(cos_sin, F32, "cos_sin", 2)
    max_pos, head_dim = cos_sin.shape
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


def block_output(attn: torch.Tensor, residual: torch.Tensor, wo: PackedWeight,
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
    _C.block_output(rows.data_ptr(), wo.cols, residual.data_ptr(), out_weight,
                    norm_weight.data_ptr(), eps, gate_up, down, out.data_ptr(),
                    new_residual.data_ptr(), tokens, hidden, ffn_width,
                    INT8_ACTIVATIONS_DEFAULT)
    return out, new_residual
