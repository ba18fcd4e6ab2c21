"""Elementwise and row-wise Triton kernels: fused residual + RMSNorm, rotary embedding,
SwiGLU. Semantics follow ``llama_engine.kernels.reference`` exactly, rounding included:
every intermediate the reference keeps in the input dtype is rounded to it here too."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_engine.kernels.triton._launch import rows_view

# Elements one program of silu_and_mul handles along the feature dim.
SILU_TILE = 1024
# Row width below which one warp is enough for rms_norm; wider rows get more warps.
ELEMENTS_PER_WARP = 256
MAX_WARPS = 16


def _warps_for(tile: int) -> int:
    return max(1, min(MAX_WARPS, tile // ELEMENTS_PER_WARP))


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
                     n_cols, x_row_stride, residual_row_stride, eps,
                     HAS_RESIDUAL: tl.constexpr, TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, TILE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        # The reference adds in the input dtype, so round the sum before normalising it.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(new_residual_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (xf * inv_rms * weight).to(x.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of (x + residual); returns (normed, x + residual), like the reference."""
    n_cols = x.shape[-1]
    x_rows = rows_view(x)
    residual_rows = rows_view(residual) if residual is not None else x_rows
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(out) if residual is not None else x
    if x_rows.shape[0] == 0:
        return out, (x + residual if residual is not None else x)
    tile = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(x_rows.shape[0],)](
        x_rows, residual_rows, weight.contiguous(), out, new_residual,
        n_cols, x_rows.stride(0), residual_rows.stride(0), eps,
        HAS_RESIDUAL=residual is not None, TILE=tile, num_warps=_warps_for(tile))
    return out, new_residual


@triton.jit
def _rope_heads(src_ptr, dst_ptr, token, n_heads, token_stride, head_stride, cos, sin, half,
                HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr):
    """Rotate every head of one token: [n_heads, 2*half] -> dst (contiguous [T, H, D])."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    cols = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < n_heads) & (cols < half)
    src = src_ptr + token * token_stride + heads * head_stride + cols
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + half, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    dst = dst_ptr + (token * n_heads + heads) * (2 * half) + cols
    tl.store(dst, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(dst + half, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cos_sin_ptr,
                 n_q_heads, n_kv_heads, q_token_stride, q_head_stride,
                 k_token_stride, k_head_stride, cos_sin_stride, half,
                 HALF_PAD: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
                 KV_HEADS_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)[None, :]
    row = cos_sin_ptr + position * cos_sin_stride
    cos = tl.load(row + cols, mask=cols < half, other=0.0).to(tl.float32)
    sin = tl.load(row + half + cols, mask=cols < half, other=0.0).to(tl.float32)
    _rope_heads(q_ptr, q_out_ptr, token, n_q_heads, q_token_stride, q_head_stride, cos, sin,
                half, HALF_PAD, Q_HEADS_PAD)
    _rope_heads(k_ptr, k_out_ptr, token, n_kv_heads, k_token_stride, k_head_stride, cos, sin,
                half, HALF_PAD, KV_HEADS_PAD)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
         cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (rotate-half) of q [T, H, D] and k [T, Hkv, D]; new tensors."""
    n_tokens, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    half = head_dim // 2
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos_sin = rows_view(cos_sin)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if n_tokens == 0:
        return q_out, k_out
    _rope_kernel[(n_tokens,)](
        q, k, q_out, k_out, positions.contiguous(), cos_sin, n_q_heads, n_kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0), half,
        HALF_PAD=triton.next_power_of_2(half), Q_HEADS_PAD=triton.next_power_of_2(n_q_heads),
        KV_HEADS_PAD=triton.next_power_of_2(n_kv_heads))
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, n_features, row_stride, TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
    mask = cols < n_features
    gate = tl.load(gate_up_ptr + row * row_stride + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * row_stride + n_features + cols, mask=mask, other=0.0)
    gate_f = gate.to(tl.float32)
    # silu is rounded to the input dtype before the product, as in the reference.
    activated = (gate_f / (1.0 + tl.exp(-gate_f))).to(gate.dtype)
    out = activated.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * n_features + cols, out.to(gate.dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: gate_up [..., 2F] = concat(gate, up) -> silu(gate) * up [..., F]."""
    n_features = gate_up.shape[-1] // 2
    rows = rows_view(gate_up)
    out = torch.empty((*gate_up.shape[:-1], n_features), dtype=gate_up.dtype,
                      device=gate_up.device)
    if rows.shape[0] == 0 or n_features == 0:
        return out
    tile = min(SILU_TILE, triton.next_power_of_2(n_features))
    grid = (rows.shape[0], triton.cdiv(n_features, tile))
    _silu_and_mul_kernel[grid](rows, out, n_features, rows.stride(0), TILE=tile)
    return out
