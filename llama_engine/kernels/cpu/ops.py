"""Torch-facing wrappers of the C++ CPU kernels for the non-matmul hot ops.

Same signatures and results as ``llama_engine.kernels.reference``; inputs are float32 CPU
tensors. Differences from the reference, all documented per function:
  * ``rope`` rotates q and k in place and returns the same tensors;
  * ``store_kv`` skips negative slots (padding tokens) instead of wrapping around;
  * ``sample`` checks its parameters (temperature >= 0, top_p > 0, min_p and uniform in
    [0, 1]) rather than returning an arbitrary token for out-of-range values.
Integer metadata of either width (int32/int64) is accepted and converted as the kernels need.

Single-stream decode calls these ~300 times per token on one-row tensors, where the wrapper
used to cost several times the kernel. So the hot ops hand the extension raw addresses
(``data_ptr()``) plus sizes and strides, and all the checks that keep those addresses safe
(device, dtype, rank, shape, layout) happen here, cheapest first: inputs that are already
float32 and dense pay a few attribute reads, and only the others go through the converting
or raising slow paths. A temporary copy made here is held in a local variable until the
kernel has returned. Outputs are allocated with torch. ``sample`` (once per step) still
passes numpy views.
"""
from __future__ import annotations

from typing import NoReturn

import numpy as np
import torch

from llama_engine import _C

F32, I32, I64 = torch.float32, torch.int32, torch.int64


# ------------------------------------------------------------------ argument checks

def _fail(name: str, reason: str) -> NoReturn:
    raise ValueError(f"{name}: {reason}")


def _require_cpu(t: torch.Tensor, name: str) -> None:
    if not t.is_cpu:
        _fail(name, f"expected a CPU tensor, got one on {t.device}")


def _require_float32(t: torch.Tensor, name: str) -> None:
    """Activations and caches are never converted: another dtype is the caller's bug."""
    _require_cpu(t, name)
    if t.dtype is not F32:
        _fail(name, f"unexpected dtype {str(t.dtype).removeprefix('torch.')}")


def _require_dims(t: torch.Tensor, name: str, ndim: int) -> None:
    if t.dim() != ndim:
        _fail(name, f"expected {ndim} dims, got {t.dim()}")


def _dense_float32(t: torch.Tensor, name: str) -> torch.Tensor:
    """A float32 input as a C-contiguous tensor (a copy only when it is strided)."""
    if t.dtype is F32 and t.is_cpu and t.is_contiguous():
        return t
    _require_float32(t, name)
    return t.contiguous()


def _converted(t: torch.Tensor, dtype: torch.dtype, name: str, ndim: int) -> torch.Tensor:
    """A parameter or metadata tensor as C-contiguous `dtype` with `ndim` dims (converted or
    copied once when it is not: int32 and int64 metadata are both accepted)."""
    if not (t.dtype is dtype and t.is_cpu and t.is_contiguous()):
        _require_cpu(t, name)
        t = t.to(dtype).contiguous()
    if t.dim() != ndim:
        _require_dims(t, name, ndim)
    return t


def _token_rows(t: torch.Tensor, name: str) -> tuple[torch.Tensor, int, torch.Size]:
    """A float32 [T, H, D] tensor whose per-token dims are dense, its token stride in
    elements and its shape. Dim 0 may have any stride (q/k/v are slices of one fused QKV
    output); other layouts are copied."""
    if t.dtype is F32 and t.is_cpu and t.dim() == 3:
        shape = t.shape
        token_stride, head_stride, dim_stride = t.stride()
        if dim_stride == 1 and head_stride == shape[2]:
            return t, token_stride, shape
    _require_float32(t, name)
    _require_dims(t, name, 3)
    if not _per_token_dims_dense(t):
        t = t.contiguous()
    return t, t.stride(0), t.shape


def _per_token_dims_dense(t: torch.Tensor) -> bool:
    """Whether every dim after the first is C-contiguous (dim 0 may have any stride)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True


# ------------------------------------------------------------------------------ ops

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim with the residual add fused in front.

    Returns (normed, new_residual): new_residual = x + residual (x itself when residual is
    None), normed = new_residual * rsqrt(mean(new_residual^2) + eps) * weight. Both keep
    x's leading dims.
    """
    rows = _dense_float32(x, "x")
    hidden = rows.shape[-1]
    tokens = rows.numel() // hidden if hidden else 0
    weight = _converted(weight, F32, "weight", 1)
    if weight.numel() != hidden:
        _fail("weight", "length must equal the hidden size")
    normed = torch.empty_like(rows)
    if residual is None:
        _C.rms_norm(rows.data_ptr(), weight.data_ptr(), eps, 0, normed.data_ptr(), 0, tokens,
                    hidden)
        return normed, x
    residual = _matching_residual(residual, rows)
    new_residual = torch.empty_like(rows)
    _C.rms_norm(rows.data_ptr(), weight.data_ptr(), eps, residual.data_ptr(),
                normed.data_ptr(), new_residual.data_ptr(), tokens, hidden)
    return normed, new_residual


def _matching_residual(residual: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The residual as dense float32 rows of x's shape (any leading dims of as many rows)."""
    if residual.dtype is F32 and residual.is_cpu and residual.is_contiguous() \
            and residual.shape == rows.shape:
        return residual
    _require_cpu(residual, "residual")
    residual = residual.to(F32).contiguous()
    if residual.shape[-1:] != rows.shape[-1:] or residual.numel() != rows.numel():
        _fail("residual/new_residual", "shape must match x")
    return residual


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
         cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding ("rotate half") applied IN PLACE to q [T, H, D] and k [T, Hkv, D].

    q and k may be token-strided views (slices of one fused QKV output); positions is [T]
    (any int dtype), cos_sin [max_pos, D] with cos in the first D/2 columns, sin in the rest.
    Returns (q, k), the same tensors, rotated.
    """
    q_rows, q_stride, (tokens, q_heads, head_dim) = _token_rows(q, "q")
    k_rows, k_stride, (k_tokens, k_heads, k_head_dim) = _token_rows(k, "k")
    if k_head_dim != head_dim or head_dim % 2 != 0:
        _fail("q/k", "same even head dim expected")
    if k_tokens != tokens:
        _fail("q/k", "same number of tokens expected")
    positions = _converted(positions, I64, "positions", 1)
    if positions.numel() != tokens:
        _fail("positions", "one per token expected")
    cos_sin = _converted(cos_sin, F32, "cos_sin", 2)
    max_pos, table_width = cos_sin.shape
    if table_width != head_dim:
        _fail("cos_sin", "width must equal the head dim")
    _C.rope(q_rows.data_ptr(), q_stride, q_heads, k_rows.data_ptr(), k_stride, k_heads,
            tokens, head_dim, positions.data_ptr(), cos_sin.data_ptr(), max_pos)
    if q_rows is not q:  # rotated a dense copy: the contract is in place
        q.copy_(q_rows)
    if k_rows is not k:
        k.copy_(k_rows)
    return q, k


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: gate_up [..., 2F] = concat(gate, up) -> silu(gate) * up, [..., F]."""
    rows = _dense_float32(gate_up, "gate_up")
    double_width = rows.shape[-1]
    if double_width % 2 != 0:
        _fail("gate_up", "last dim must be even")
    width = double_width // 2
    count = rows.numel() // double_width if double_width else 0
    out = _float32_rows_like(rows, count, width)
    _C.silu_and_mul(rows.data_ptr(), out.data_ptr(), count, width)
    return out


def _float32_rows_like(t: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """An empty float32 [..., width] with t's leading dims (`count` rows in all)."""
    if t.dim() == 2:  # the usual case, and the cheapest torch.empty call
        return torch.empty(count, width, dtype=F32)
    return torch.empty(*t.shape[:-1], width, dtype=F32)


def attention_metadata(slot_mapping: torch.Tensor | None, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       scale: float) -> _C.AttentionMetadata:
    """A step's paged-attention metadata as the extension takes it, checked once (dtypes,
    ranks, one entry per sequence, one slot per query token): slot_mapping int64 [T] (None
    when the step only attends), block_tables int32 [S, max_blocks], context_lens int32
    [S], cu_seqlens_q int32 [S + 1]. Either int width is accepted and converted here.
    Raises ValueError naming the offending tensor."""
    slots = None if slot_mapping is None else _converted(slot_mapping, I64, "slot_mapping", 1)
    return _C.AttentionMetadata(slots, _converted(block_tables, I32, "block_tables", 2),
                                _converted(context_lens, I32, "context_lens", 1),
                                _converted(cu_seqlens_q, I32, "cu_seqlens_q", 1), scale)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k/v [T, Hkv, D] into the paged caches [blocks, block_size, Hkv, D] at
    slot_mapping [T] (int32 or int64; negative slots are padding and are skipped)."""
    _C.store_kv(k, v, k_cache, v_cache, _converted(slot_mapping, I64, "slot_mapping", 1))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention of new query rows over each sequence's paged KV cache; see
    reference.paged_attention for the layout. Metadata may be int32 or int64."""
    out = torch.empty(q.shape, dtype=F32)
    _C.paged_attention(q, k_cache, v_cache,
                       attention_metadata(None, block_tables, context_lens, cu_seqlens_q, scale),
                       out)
    return out


def store_kv_and_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor,
                        metadata: _C.AttentionMetadata) -> torch.Tensor:
    """store_kv(k, v) at the metadata's slots, then paged_attention(q), in one extension
    call; metadata from ``attention_metadata`` (built once a step, used by every layer)."""
    out = torch.empty(q.shape, dtype=F32)
    _C.store_kv_and_attend(q, k, v, k_cache, v_cache, metadata, out)
    return out


# ------------------------------------------------------------- sample (numpy views)

def _view(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor (strides kept)."""
    return (t.detach() if t.requires_grad else t).numpy()


def _dense(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """Numpy view of `t` as a C-contiguous array of `dtype` (copies only when it must)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    return _view(t)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token id per row of logits [B, V]: greedy where temperature is 0, otherwise
    temperature / top-k / top-p / min-p filtering walked with uniform[i]; int64 [B]."""
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    _C.sample(_dense(logits, torch.float32), _dense(temperature, torch.float64),
              _dense(top_k, torch.int64), _dense(top_p, torch.float64),
              _dense(min_p, torch.float64), _dense(uniform, torch.float64), _view(out))
    return out
