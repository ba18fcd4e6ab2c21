"""Torch-facing wrappers of the C++ CPU kernels for the non-matmul hot ops.

Same signatures and results as ``llama_engine.kernels.reference``; inputs are float32 CPU
tensors. Differences from the reference, all documented per function:
  * ``rope`` rotates q and k in place and returns the same tensors;
  * ``store_kv`` skips negative slots (padding tokens) instead of wrapping around;
  * ``sample`` checks its parameters (temperature >= 0, top_p > 0, min_p and uniform in
    [0, 1]) rather than returning an arbitrary token for out-of-range values.
Integer metadata of either width (int32/int64), and parameters (norm weights, the cos/sin
table, sampling parameters) of any dtype, are converted to what the kernels take; strided
inputs are copied dense. Activations and caches are never converted.

The extension takes every tensor as a view (csrc/views.h) and checks its device, dtype,
rank, shape and layout before any memory is touched: what does not fit is a ValueError
naming the tensor. So the wrappers here only convert and allocate outputs, and the cheap
case (inputs already of the right dtype and layout) is a few attribute reads. A temporary
copy made here is held in a local variable until the kernel has returned.
"""
from __future__ import annotations

import torch

from llama_engine import _C

F32, F64, I32, I64 = torch.float32, torch.float64, torch.int32, torch.int64


# --------------------------------------------------------------------- conversions
# Shared by every torch-facing wrapper of the extension (ops, lora, decoder_layer): they
# convert and allocate; the extension checks.

def dense(t: torch.Tensor) -> torch.Tensor:
    """t as a C-contiguous tensor: t itself when it already is, else a dense copy (same
    dtype and device). For activations, whose dtype is never converted."""
    return t if t.is_contiguous() else t.contiguous()


def dense_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A parameter or metadata tensor as C-contiguous `dtype`: t itself when it already is,
    else converted (e.g. int64 indices to int32) or copied once. The device is left as it
    is, for the extension to check."""
    if t.dtype is dtype and t.is_contiguous():
        return t
    return t.to(dtype).contiguous()


def _token_dense(t: torch.Tensor) -> torch.Tensor:
    """t [T, H, D], or a C-contiguous copy when its per-token dims are not dense. Dim 0 may
    have any stride: q/k/v are slices of one fused QKV output."""
    if t.dim() == 3:
        _, heads, head_dim = t.shape
        _, head_stride, dim_stride = t.stride()
        if (dim_stride == 1 or head_dim == 1) and (head_stride == head_dim or heads == 1):
            return t
    return t.contiguous()


# ------------------------------------------------------------------------------ ops

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim with the residual add fused in front.

    x float32 [..., C], weight [C], residual None or [..., C] like x. Returns (normed,
    new_residual): new_residual = x + residual (x itself when residual is None), normed =
    new_residual * rsqrt(mean(new_residual^2) + eps) * weight, both shaped like x. Raises
    ValueError naming a tensor whose device, dtype or shape does not fit.
    """
    rows = dense(x)
    weight = dense_as(weight, F32)
    normed = torch.empty_like(rows)
    if residual is None:
        _C.rms_norm(rows, weight, eps, None, normed, None)
        return normed, x
    new_residual = torch.empty_like(rows)
    _C.rms_norm(rows, weight, eps, dense_as(residual, F32), normed, new_residual)
    return normed, new_residual


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
         cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding ("rotate half") applied IN PLACE to q [T, H, D] and k [T, Hkv, D].

    q and k may be token-strided views (slices of one fused QKV output); positions is [T]
    (any int dtype), cos_sin [max_pos, D] with cos in the first D/2 columns, sin in the rest.
    Returns (q, k), the same tensors, rotated. Raises ValueError naming a tensor that does
    not fit, or for positions outside the table.
    """
    q_rows, k_rows = _token_dense(q), _token_dense(k)
    _C.rope(q_rows, k_rows, dense_as(positions, I64), dense_as(cos_sin, F32))
    if q_rows is not q:  # rotated a dense copy: the contract is in place
        q.copy_(q_rows)
    if k_rows is not k:
        k.copy_(k_rows)
    return q, k


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: gate_up float32 or bfloat16 [..., 2F] = concat(gate, up) -> silu(gate) * up,
    [..., F] of gate_up's dtype (float32 math, rounded once). Raises ValueError for another
    dtype or an odd last dim."""
    rows = dense(gate_up)
    shape = rows.shape
    width = shape[-1] // 2 if shape else 0
    if len(shape) == 2:  # the usual case, and the cheapest torch.empty call
        out = torch.empty(shape[0], width, dtype=rows.dtype)
    else:
        out = torch.empty(*shape[:-1], width, dtype=rows.dtype)
    _C.silu_and_mul(rows, out)
    return out


def silu_and_mul_backward(gate_up: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient [..., 2F] of ``silu_and_mul`` at gate_up float32 or bfloat16 [..., 2F]
    given grad_out [..., F] of the same dtype (d_gate = dy up silu'(gate), d_up = dy
    silu(gate)). Raises ValueError for a dtype or shape that does not fit."""
    rows = dense(gate_up)
    grad_gate_up = torch.empty_like(rows)
    _C.silu_and_mul_backward(rows, dense(grad_out), grad_gate_up)
    return grad_gate_up


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                  with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``reference.cross_entropy`` in one pass over each row of logits (float32 or
    bfloat16 [rows, vocab]). Raises ValueError naming a tensor that does not fit or a label
    outside the vocabulary."""
    rows = dense(logits)
    loss = torch.empty(rows.shape[0], dtype=F32)
    grad = torch.empty_like(rows) if with_grad else None
    _C.cross_entropy(rows, dense_as(labels, I64), dense_as(scale, F32), loss, grad)
    return loss, grad


def attention_metadata(slot_mapping: torch.Tensor | None, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       scale: float) -> _C.AttentionMetadata:
    """A step's paged-attention metadata as the extension takes it, checked once (dtypes,
    ranks, one entry per sequence, one slot per query token): slot_mapping int64 [T] (None
    when the step only attends), block_tables int32 [S, max_blocks], context_lens int32
    [S], cu_seqlens_q int32 [S + 1]. Either int width is accepted and converted here.
    Raises ValueError naming the offending tensor."""
    slots = None if slot_mapping is None else dense_as(slot_mapping, I64)
    return _C.AttentionMetadata(slots, dense_as(block_tables, I32),
                                dense_as(context_lens, I32), dense_as(cu_seqlens_q, I32), scale)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k/v [T, Hkv, D] into the paged caches [blocks, block_size, Hkv, D] at
    slot_mapping [T] (int32 or int64; negative slots are padding and are skipped)."""
    _C.store_kv(k, v, k_cache, v_cache, dense_as(slot_mapping, I64))


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


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token id per row of logits [B, V]: greedy where temperature is 0, otherwise
    temperature / top-k / top-p / min-p filtering walked with uniform[i]; int64 [B]. The
    parameters are [B] each. Raises ValueError for a shape or value out of range."""
    out = torch.empty(logits.shape[0], dtype=I64)
    _C.sample(dense_as(logits, F32), dense_as(temperature, F64), dense_as(top_k, I64),
              dense_as(top_p, F64), dense_as(min_p, F64), dense_as(uniform, F64), out)
    return out
