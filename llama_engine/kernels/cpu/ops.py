"""Torch-facing wrappers of the C++ CPU kernels for the non-matmul hot ops.

Same signatures and results as ``llama_engine.kernels.reference``; inputs are float32 CPU
tensors. Tensors reach the extension as zero-copy numpy views and outputs are allocated
here with torch. Differences from the reference, all documented per function:
  * ``rope`` rotates q and k in place and returns the same tensors;
  * ``store_kv`` skips negative slots (padding tokens) instead of wrapping around;
  * ``sample`` checks its parameters (temperature >= 0, top_p > 0, min_p and uniform in
    [0, 1]) rather than returning an arbitrary token for out-of-range values.
Integer metadata of either width (int32/int64) is accepted and converted as the kernels need.
"""
from __future__ import annotations

import numpy as np
import torch

from llama_engine import _C


# The helpers below skip no-op torch calls (.to, .contiguous, .detach, .reshape): each costs
# about a microsecond, which matters for decode-sized inputs called ~200 times a step.

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


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., width] as a C-contiguous 2-D [rows, width] tensor."""
    if t.dim() != 2:
        t = t.reshape(-1, t.shape[-1])
    return t if t.is_contiguous() else t.contiguous()


def _like_input(out: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Gives a 2-D result the leading dims of the original input."""
    return out if original.dim() == 2 else out.view(*original.shape[:-1], out.shape[-1])


def _per_token_dims_dense(t: torch.Tensor) -> bool:
    """Whether every dim after the first is C-contiguous (dim 0 may have any stride)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return t.stride(0) >= 0


def _tokens_view(t: torch.Tensor) -> np.ndarray:
    """View of a [T, ...] tensor whose rows may be strided (a slice of a fused projection)
    but whose per-token dims are dense; copies otherwise."""
    return _view(t if _per_token_dims_dense(t) else t.contiguous())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim with the residual add fused in front.

    Returns (normed, new_residual): new_residual = x + residual (x itself when residual is
    None), normed = new_residual * rsqrt(mean(new_residual^2) + eps) * weight.
    """
    x2 = _as_rows(x)
    normed = torch.empty_like(x2)
    if residual is None:
        _C.rms_norm(_view(x2), _dense(weight, torch.float32), float(eps), None, _view(normed),
                    None)
        return _like_input(normed, x), x
    new_residual = torch.empty_like(x2)
    _C.rms_norm(_view(x2), _dense(weight, torch.float32), float(eps),
                _dense(_as_rows(residual), torch.float32), _view(normed), _view(new_residual))
    return _like_input(normed, x), _like_input(new_residual, x)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
         cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding ("rotate half") applied IN PLACE to q [T, H, D] and k [T, Hkv, D].

    q and k may be token-strided views (slices of one fused QKV output); positions is [T]
    (any int dtype), cos_sin [max_pos, D] with cos in the first D/2 columns, sin in the rest.
    Returns (q, k), the same tensors, rotated.
    """
    q_view, k_view = _tokens_view(q), _tokens_view(k)
    _C.rope(q_view, k_view, _dense(positions, torch.int64), _dense(cos_sin, torch.float32))
    return _written_back(q, q_view), _written_back(k, k_view)


def _written_back(original: torch.Tensor, rotated: np.ndarray) -> torch.Tensor:
    """The tensor the kernel wrote into: `original` unless it had to be made contiguous,
    in which case the rotated copy is written back so that the in-place contract holds."""
    result = torch.from_numpy(rotated)
    if result.data_ptr() != original.data_ptr():
        original.copy_(result)
    return original


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: gate_up [..., 2F] = concat(gate, up) -> silu(gate) * up, [..., F]."""
    rows = _as_rows(gate_up)
    out = torch.empty(rows.shape[0], rows.shape[1] // 2, dtype=torch.float32)
    _C.silu_and_mul(_view(rows), _view(out))
    return _like_input(out, gate_up)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k/v [T, Hkv, D] into the paged caches [blocks, block_size, Hkv, D] at
    slot_mapping [T] (int32 or int64; negative slots are padding and are skipped)."""
    _C.store_kv(_tokens_view(k), _tokens_view(v), _view(k_cache), _view(v_cache),
                _dense(slot_mapping, torch.int64))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention of new query rows over each sequence's paged KV cache; see
    reference.paged_attention for the layout. Metadata may be int32 or int64."""
    out = torch.empty(q.shape, dtype=torch.float32)
    _C.paged_attention(_tokens_view(q), _view(k_cache), _view(v_cache),
                       _dense(block_tables, torch.int32), _dense(context_lens, torch.int32),
                       _dense(cu_seqlens_q, torch.int32), float(scale), _view(out))
    return out


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token id per row of logits [B, V]: greedy where temperature is 0, otherwise
    temperature / top-k / top-p / min-p filtering walked with uniform[i]; int64 [B]."""
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    _C.sample(_dense(logits, torch.float32), _dense(temperature, torch.float64),
              _dense(top_k, torch.int64), _dense(top_p, torch.float64),
              _dense(min_p, torch.float64), _dense(uniform, torch.float64), _view(out))
    return out
